"""The errors mpc-ft turns into exit codes (see DESIGN.md: 2 bad input, 3 peer failure)."""

from __future__ import annotations


class BadInput(Exception):
    """Bad input or configuration: the CLI prints the one-line message and exits 2.

    The message names the file (or flag) and the problem, e.g. ``data.csv: no 'label' column``.
    """


class PeerFailure(Exception):
    """A peer failed or timed out: the CLI prints the one-line message and exits 3."""
