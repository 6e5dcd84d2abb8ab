"""What multiparty.py's fork server imports once, so that each party process it forks starts with
torch and CrypTen loaded: about 2.5 s of CPU per process when each imports them itself.

Importing this module imports CrypTen through compat (patch 1): unlike the rest of mpc_ft, its
import does something, and only multiparty.py names it.
"""

from mpc_ft import compat

crypten = compat.import_crypten()
