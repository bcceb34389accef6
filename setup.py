"""Install momentum_hook; the version is read from momentum_hook/version.py."""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    namespace = {}
    with open(os.path.join(HERE, 'momentum_hook', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


with open(os.path.join(HERE, 'README.md'), encoding='utf-8') as f:
    long_description = f.read()

setup(
    name='momentum_hook',
    version=read_version(),
    description='Cosine-scheduled momentum (EMA) target update hook for '
    'BYOL / MoCo v3 / DINO on mmcv 1.x and MMEngine runners',
    long_description=long_description,
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    # importlib.resources.files (the demo's config) needs Python 3.9.
    python_requires='>=3.9',
    # configs/ ships inside the package as momentum_hook.configs, so that the
    # demo finds its default config from an installed package too.
    packages=find_packages(include=['momentum_hook', 'momentum_hook.*']) +
    ['momentum_hook.configs'],
    package_dir={'momentum_hook.configs': 'configs'},
    package_data={'momentum_hook.configs': ['*.py']},
    # The drop-in for MMSelfSup 0.x configs is a top-level module: importing
    # a submodule would run momentum_hook/__init__.py first (registration.py
    # says why that matters).
    py_modules=['momentum_hook_dropin'],
    # The range the test suite passes on: requirements/torch.txt (the tested
    # stack) and requirements/torch-latest.txt (the newest on the index),
    # both run by .ci/run. The sharded update reads torch internals (FSDP1's
    # FlatParameter, DTensor's local tensor) that other versions may lack.
    install_requires=['torch>=2.14,<2.16'],
    extras_require={
        # mmcv 1.x builds from source and needs pkg_resources at build time:
        # pip install "setuptools<81" wheel, then --no-build-isolation.
        'mmcv': ['mmcv>=1.4,<2', 'torchvision'],
        'mmengine': ['mmengine>=0.7,<1'],
        # DS_BUILD_OPS=0 pip install --no-build-isolation: no compiled ops.
        'deepspeed': ['deepspeed>=0.14'],
        'demo': ['scikit-learn>=1.0', 'matplotlib>=3.3'],
        'tests': ['pytest>=7'],
    },
    # No license classifier: the SPDX `license` above replaces it (setuptools
    # deprecates the classifiers).
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
