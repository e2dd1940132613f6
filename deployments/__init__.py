"""Standing up finetune on Prefect: provision a server, serve without a worker, a launchd agent for Macs.

Run from the repository root: ``python -m deployments.provision``, ``python -m deployments.serve``.
"""
