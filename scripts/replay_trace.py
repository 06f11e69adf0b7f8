#!/usr/bin/env python
"""Replay a trace against a running greenroom server (same as `greenroom replay`)."""

import sys

from greenroom.replay.cli import main

if __name__ == "__main__":
    sys.exit(main())
