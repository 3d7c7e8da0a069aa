"""`python -m job ...`, so that `torchrun ... -m job train ...` works."""

from job.cli import main

main()
