"""`python -m jmoe.sample RUN_DIR --prompt ...`: text from a trained checkpoint."""

from jmoe.train.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
