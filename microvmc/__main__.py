from microvmc.cli import entry

entry()
