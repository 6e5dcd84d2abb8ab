"""mpc-ft: fine-tune a transformer head on a frozen public backbone among parties that keep their
data and model secret, with CrypTen secret sharing. See README.md; `mpc-ft demo` runs it locally."""

from mpc_ft.compat import INSTALL_HINT, crypten_available

if not crypten_available():
    raise ImportError(INSTALL_HINT) from None

__version__ = "0.1.0"
