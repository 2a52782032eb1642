from adalora_cli.cli import app

app()
