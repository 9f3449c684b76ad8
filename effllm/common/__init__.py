"""What every stage and command shares, and nothing heavy (no torch): the error family and exit codes
(errors), atomic file writes (fileio), the command-line parser's usage-error style (cli_args).
The bottom layer: it imports nothing else of effllm."""
