from finetune.cli.main import main

main()
