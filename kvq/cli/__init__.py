"""The ``kvq`` command line: one subcommand per file."""
