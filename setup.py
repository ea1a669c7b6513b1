"""Packaging of hbp-image-tasks: all metadata lives here (release number on one line)."""

from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as readme:
    long_description = readme.read()

setup(
    name="hbp-image-tasks",
    version='0.1.0',
    description=(
        "Fetch brain images, convert them to Neuroglancer precomputed "
        "and publish them on OpenStack Swift"
    ),
    long_description=long_description,
    long_description_content_type="text/markdown",
    url="https://github.com/HumanBrainProject/hbp-image-service",
    license="Apache-2.0",
    packages=find_packages(include=["hbp_image_tasks", "hbp_image_tasks.*"]),
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=[
        "requests>=2.25",
        "python-swiftclient>=4.0",
        "keystoneauth1>=4.0",
        "neuroglancer-scripts>=1.2.0",
        "numpy>=1.21",
        "Pillow>=9.0",
        "nibabel>=4.0",
        "tqdm>=4.60",
        # ISA-L gzips chunks that barely compress (noisy data) 20x faster than zlib;
        # zlib-ng's run-length deflate gzips 16-bit images 2.6x faster than libdeflate.
        "isal>=1.6",
        "zlib-ng>=0.4",
        # Reads only the tiles or strips of a TIFF section that a unit's region needs.
        "tifffile>=2022.8.12",
    ],
    extras_require={
        "test": ["pytest>=7", "responses>=0.22", "ruff>=0.6", "tensorstore>=0.1.60"],
        "browser": ["playwright>=1.40", "neuroglancer>=2.38"],
    },
    entry_points={
        "console_scripts": [
            "fetch_input = hbp_image_tasks.fetch_input:main",
            "ingest_ngs = hbp_image_tasks.ingest_ngs:main",
            "upload_results = hbp_image_tasks.upload_results:main",
            "ingest = hbp_image_tasks.ingest:main",
            "check_viewer = hbp_image_tasks.check_viewer:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)
