"""`python -m overfill` (also what `accelerate launch -m overfill` runs)."""

from overfill.cli import main

main()
