"""`python -m jmoe.plan --config configs/gpt_moe.py:mixtral_8x7b ...`: the
planner's command line (`jmoe.planner.cli`)."""

from jmoe.planner.cli import main

if __name__ == "__main__":
    main()
