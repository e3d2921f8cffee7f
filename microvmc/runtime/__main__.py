from microvmc.runtime.cli import entry

entry()
