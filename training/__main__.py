"""One command line for the training side: `python -m training distill|fit|calibrate [--help]`.

    distill    the base model answers the project's instructions; keeps its hidden states
    fit        trains Medusa heads on them, the base frozen
    eagle      trains the EAGLE-style draft layer on them, the base frozen
    calibrate  builds the candidate tree from the heads' accuracy and this device's step cost
"""

import sys

from training import calibrate, distill, eagle, fit

COMMANDS = {"distill": distill.main, "fit": fit.main, "eagle": eagle.main, "calibrate": calibrate.main}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
