"""Makes the bundled example stack from the MRI brain that ships with nibabel.

The sections in ``examples/brain-stack/`` were made with this script; run it
again to regenerate them: ``python examples/make_example_stack.py``.
"""

from __future__ import annotations

import pathlib

import nibabel
import numpy as np
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
SCALE = 6  # 33x41 voxels of 2 mm -> 198x246 pixels of 1/3 mm


def main() -> None:
    """Writes 8-bit PNG sections (axial slices, upsampled) and a decoy file."""
    source = pathlib.Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    volume = np.asarray(nibabel.load(str(source)).dataobj, dtype=np.float32)
    volume = np.clip(volume / np.percentile(volume, 99.5), 0, 1) * 255
    target = HERE / "brain-stack"
    target.mkdir(exist_ok=True)
    for index, z in enumerate(range(6, volume.shape[2] - 3), start=1):
        section = np.flipud(volume[:, :, z].T).astype(np.uint8)
        image = Image.fromarray(section).resize(
            (section.shape[1] * SCALE, section.shape[0] * SCALE), Image.BICUBIC
        )
        image.save(target / f"brain_s{index}.png", optimize=True)
    (target / "README.txt").write_text(
        "Axial sections of nibabel's anatomical.nii test brain, upsampled 6x.\n"
        "Made by examples/make_example_stack.py. Not a section: this file.\n"
    )


if __name__ == "__main__":
    main()
