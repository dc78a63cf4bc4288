"""The `entityclip` subcommands: each module defines configure_<name>(parser) and run_<name>(args)."""
