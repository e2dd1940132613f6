"""The stages the Prefect flow and the CLI run, as plain functions, and what they return."""
