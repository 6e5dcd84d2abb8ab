"""mpc-ft: fine-tune a transformer head on a frozen public backbone among parties that keep their
data and model secret, with CrypTen secret sharing. See README.md; `mpc-ft demo` runs it locally.

Importing mpc_ft needs no CrypTen (a trained head loads in plain torch); the MPC parts raise an
ImportError whose one-line message says how to install it (compat.INSTALL_HINT).
"""

__version__ = "0.1.0"
