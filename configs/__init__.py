"""MMCV-style configs, installed as the package ``momentum_hook.configs``.

This file makes ``configs/`` a regular package so that
``importlib.resources.files('momentum_hook.configs')`` finds the configs in
an editable install too (setuptools maps nested namespace packages only
for top-level names).
"""
