"""The main job: BYOL on scikit-learn's digits with the momentum hook.

``python -m momentum_hook.demo`` trains a small BYOL (:mod:`.model`) on two
augmented views of the digits (:mod:`.data`) with a real mmcv 1.x
``EpochBasedRunner`` built from ``configs/byol_digits.py`` (:mod:`.train`),
then compares its frozen features with two baselines on held-out images
(:mod:`.evaluate`, :mod:`.report`) and plots the hook's momentum and the loss
(:mod:`.plot`). See ``python -m momentum_hook.demo --help``.
"""
