from knitwatch.daemon.cli.main import run

run()
