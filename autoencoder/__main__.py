"""``python -m autoencoder``: list the model presets (sizes and latent shapes)."""

import sys

from autoencoder.models import main

if __name__ == "__main__":
    sys.exit(main())
