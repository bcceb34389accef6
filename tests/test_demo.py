"""The demo: one short run of ``python -m momentum_hook.demo`` as a user types
it, resuming it, the evaluation functions on data with known answers, and
the CLI's errors.

The short run is the default config with tiny overrides (2 epochs of 4
iterations), so that it trains for a few seconds: the real runner, hooks,
logs, checkpoints, evaluation and plot, not their stand-ins. It is the one
test in a fresh interpreter; the resumed run and the errors go through
``main(argv)`` in this one.
"""

import glob
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.mmcv, pytest.mark.slow]
pytest.importorskip('mmcv')
pytest.importorskip('sklearn', reason='the demo needs scikit-learn')
import numpy as np
from mmcv import Config
from mmcv.cnn import MODELS
from momentum_testing import reference_momentum

from momentum_hook.demo.__main__ import main
from momentum_hook.demo.data import DigitsTwoViews, load_digits_split
from momentum_hook.demo.evaluate import (
    evaluate_features,
    knn_accuracy,
    nearest_centroid_accuracy,
)
from momentum_hook.demo.model import DigitsBYOL
from momentum_hook.demo.train import (
    build_model,
    default_config_path,
    load_config,
)

BASE_MOMENTUM = 0.99  # configs/byol_digits.py
END_MOMENTUM = 1.0
EPOCHS = 2
BATCH = 256
SHORT = [
    f'runner.max_epochs={EPOCHS}',
    'data.train.repeat=1',
    f'data.samples_per_gpu={BATCH}',
    'log_config.interval=1',
    'evaluation.episodes=3',
]
METRICS = {'1-shot', '5-shot', 'knn'}


def expected_momentum(k, max_iters):
    """m at 0-based iteration k of K, from the schedule's closed form."""
    return reference_momentum(k, max_iters, BASE_MOMENTUM, END_MOMENTUM)


def exit_status(argv):
    """``main(argv)``'s exit status, also when argparse exits."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def train_records(work_dir):
    """The training lines of the (single) JSON log in ``work_dir``."""
    (path,) = glob.glob(osp.join(work_dir, '*.log.json'))
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if r.get('mode') == 'train']


def iters_per_epoch():
    return len(DigitsTwoViews(repeat=1)) // BATCH  # drop_last


@pytest.fixture(scope='module')
def short_run(tmp_path_factory):
    """The user's command, in a fresh interpreter."""
    work_dir = str(tmp_path_factory.mktemp('short_run'))
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'momentum_hook.demo',
            '--work-dir',
            work_dir,
            '--device',
            'cpu',
            '--cfg-options',
            *SHORT,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return work_dir, proc


def test_short_run_writes_results_in_the_documented_schema(short_run):
    work_dir, proc = short_run
    with open(osp.join(work_dir, 'results.json')) as f:
        results = json.load(f)
    assert set(results) == {'byol', 'random_init', 'pixels'}
    for scores in results.values():
        assert set(scores) == METRICS
        assert all(
            isinstance(v, float) and 0 <= v <= 1 for v in scores.values()
        )
    # The raw-pixel row does not depend on training: recompute it here.
    images, labels = load_digits_split('heldout')
    pixels = evaluate_features(
        images.flatten(1).numpy(), labels.numpy(), seeds=range(3)
    )
    assert results['pixels'] == pytest.approx(pixels)
    assert 'raw pixels' in proc.stdout and 'BYOL encoder' in proc.stdout


def test_short_run_logs_the_hooks_momentum_and_saves_checkpoints(short_run):
    work_dir, _ = short_run
    records = train_records(work_dir)
    per_epoch = iters_per_epoch()
    max_iters = EPOCHS * per_epoch
    assert len(records) == max_iters  # log interval 1
    for record in records:
        k = (record['epoch'] - 1) * per_epoch + record['iter'] - 1
        # the JSON log rounds to 5 decimals
        assert record['target_momentum'] == pytest.approx(
            expected_momentum(k, max_iters), abs=6e-6
        )
        assert np.isfinite(record['loss'])
    (text_log,) = glob.glob(osp.join(work_dir, '*.log'))
    with open(text_log) as f:
        assert f.read().count('target_momentum: ') == max_iters
    checkpoint = torch.load(
        osp.join(work_dir, f'epoch_{EPOCHS}.pth'),
        map_location='cpu',
        weights_only=False,
    )
    assert checkpoint['meta']['iter'] == max_iters
    state = checkpoint['state_dict']
    target = [k for k in state if k.startswith('target_net.')]
    assert target and all(
        not torch.equal(state[k], state[k.replace('target_net', 'online_net')])
        for k in target
        if k.endswith('weight')
    )
    with open(osp.join(work_dir, 'momentum_and_loss.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_resume_mid_run_continues_the_schedule(short_run, tmp_path):
    work_dir, _ = short_run
    threads = torch.get_num_threads()  # the config sets one thread
    try:
        assert (
            main(
                [
                    '--work-dir',
                    str(tmp_path),
                    '--device',
                    'cpu',
                    '--resume-from',
                    osp.join(work_dir, 'epoch_1.pth'),
                    '--cfg-options',
                    *SHORT,
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    per_epoch = iters_per_epoch()
    max_iters = EPOCHS * per_epoch
    resumed = train_records(str(tmp_path))
    assert [r['epoch'] for r in resumed] == [2] * per_epoch
    momenta = [r['target_momentum'] for r in resumed]
    expected = [
        expected_momentum(per_epoch + i, max_iters) for i in range(per_epoch)
    ]
    assert momenta == pytest.approx(expected, abs=6e-6)
    # a restarted schedule would begin again at the base momentum
    assert min(momenta) > BASE_MOMENTUM + 0.004
    uninterrupted = [
        r['target_momentum']
        for r in train_records(work_dir)
        if r['epoch'] == 2
    ]
    assert momenta == uninterrupted
    assert (tmp_path / 'results.json').is_file()


# The evaluation, on features with known answers.


def _directions(degrees):
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], 1)


def test_separated_clusters_score_one():
    rng = np.random.default_rng(0)
    centres = 10 * np.eye(4)
    labels = np.repeat(np.arange(4), 8)
    features = centres[labels] + rng.normal(0, 0.1, (32, 4))
    for shots in (1, 5):
        assert nearest_centroid_accuracy(features, labels, shots) == 1.0
    assert knn_accuracy(features, labels, k=5) == 1.0
    assert evaluate_features(features, labels) == {
        '1-shot': 1.0,
        '5-shot': 1.0,
        'knn': 1.0,
    }


def test_a_straddling_class_scores_two_thirds_in_every_episode():
    # A and B: two copies each of one direction. C: 40 degrees either side
    # of A. Whichever C point is labelled, the other is 40 degrees from A
    # and 80 from the labelled one: one query in three is wrong.
    features = _directions([0, 0, 180, 180, 40, -40])
    labels = np.array([0, 0, 1, 1, 2, 2])
    for seeds in ([0], range(5)):
        assert nearest_centroid_accuracy(
            features, labels, 1, seeds
        ) == pytest.approx(2 / 3)
    # Leave-one-out 1-NN: both C points find an A point first.
    assert knn_accuracy(features, labels, k=1) == pytest.approx(4 / 6)


def test_knn_ties_go_to_the_smallest_label():
    # With k=2, the neighbours of the points at 0, 20 and 90 degrees carry
    # one label each, and the tie gives 0: right for 0 and 20, wrong for 90.
    # The point at 5 degrees has two neighbours labelled 0: wrong.
    features = _directions([0, 5, 20, 90])
    labels = np.array([0, 1, 0, 1])
    assert knn_accuracy(features, labels, k=2) == 0.5


def test_knn_compares_directions_not_lengths():
    # Scaling a point leaves its cosine neighbours as they were.
    features = _directions([0, 10, 180, 190, 60])
    labels = np.array([0, 0, 1, 1, 0])
    scaled = features * np.array([[1.0], [50.0], [0.1], [3.0], [7.0]])
    assert knn_accuracy(scaled, labels, k=1) == knn_accuracy(
        features, labels, k=1
    )


def test_nearest_centroid_matches_a_loop_written_out():
    # Unit-length features, each class's mean of its support, the nearest
    # mean (Euclidean) labels the query.
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 7)
    features = rng.normal(size=(21, 5)) + labels[:, None] * 0.7
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    accuracies = []
    for seed in range(4):
        draw = np.random.default_rng(seed)
        support = [
            draw.choice(np.flatnonzero(labels == c), 3, replace=False)
            for c in range(3)
        ]
        centroids = [unit[s].mean(0) for s in support]
        hits = [
            min(range(3), key=lambda c: np.linalg.norm(unit[i] - centroids[c]))
            == labels[i]
            for i in range(21)
            if i not in np.concatenate(support)
        ]
        accuracies.append(np.mean(hits))
    assert nearest_centroid_accuracy(
        features, labels, 3, range(4)
    ) == pytest.approx(np.mean(accuracies))


def test_evaluation_rejects_impossible_settings():
    features, labels = np.eye(4), np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match='more than 2 examples per class'):
        nearest_centroid_accuracy(features, labels, 2)
    with pytest.raises(ValueError, match='k must be in'):
        knn_accuracy(features, labels, k=4)


def test_model_and_dataset_meet_the_contracts():
    torch.manual_seed(0)
    model = DigitsBYOL()
    batch = [DigitsTwoViews(repeat=2)[i] for i in (0, 1300)]
    data = {
        key: torch.stack([item[key] for item in batch])
        for key in ('img1', 'img2')
    }
    assert data['img1'].shape == (2, 1, 8, 8)
    assert not torch.equal(data['img1'], data['img2'])
    outputs = model.train_step(data)
    assert set(outputs) == {'loss', 'log_vars', 'num_samples'}
    assert outputs['num_samples'] == 2 and outputs['loss'].requires_grad
    assert model.base_momentum == model.momentum == 0.99
    assert not any(p.requires_grad for p in model.target_net.parameters())


def _image_folder(root, classes=2, per_class=6):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f'class{c}').mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f'class{c}' / f'{i}.png')
    return str(root)


def test_an_image_folder_builds_from_a_config_entry(tmp_path):
    from momentum_hook.demo.train import build_dataset

    cfg = Config(
        dict(
            data=dict(
                train=dict(
                    type='ImageFolderTwoViews',
                    root=_image_folder(tmp_path / 'train'),
                    size=8,
                    repeat=3,
                    heldout_root=_image_folder(tmp_path / 'held'),
                )
            )
        )
    )
    dataset = build_dataset(cfg)
    assert len(dataset) == 3 * 12
    item = dataset[13]
    assert item['img1'].shape == item['img2'].shape == (3, 8, 8)
    images, labels = dataset.heldout()
    assert images.shape == (12, 3, 8, 8)
    assert labels.tolist() == [0] * 6 + [1] * 6
    cfg.data.train.heldout_root = None
    assert build_dataset(cfg).heldout() is None


def test_a_missing_image_folder_is_a_demo_error(tmp_path):
    from momentum_hook.demo.train import DemoError, build_dataset

    cfg = Config(
        dict(
            data=dict(
                train=dict(
                    type='ImageFolderTwoViews', root=str(tmp_path / 'none')
                )
            )
        )
    )
    with pytest.raises(DemoError, match='cannot build the dataset'):
        build_dataset(cfg)


# The command line's answers to bad input: one line, exit status 2.


def assert_one_line_error(err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_config_is_one_line(tmp_path, capsys):
    assert (
        exit_status([str(tmp_path / 'nope.py'), '--work-dir', str(tmp_path)])
        == 2
    )
    assert_one_line_error(
        capsys.readouterr().err, 'config file not found', 'nope.py'
    )


def test_missing_scikit_learn_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'sklearn', None)  # import fails
    assert exit_status(['--work-dir', str(tmp_path)]) == 2
    assert_one_line_error(
        capsys.readouterr().err,
        'scikit-learn',
        'pip install --no-build-isolation -e ".[demo]"',
    )


@pytest.mark.parametrize(
    'options, fragments',
    [
        (['runner.max_epochs'], ['--cfg-options', 'key=value']),
        (['model.widths=(16,32'], ['--cfg-options', 'brackets']),
        (['runner.max_epochs=two'], ['runner.max_epochs must be an int']),
        (['model.widht=3'], ['cannot build the model', 'widht']),
    ],
)
def test_bad_cfg_options_are_one_line(tmp_path, capsys, options, fragments):
    assert (
        exit_status(
            [
                '--work-dir',
                str(tmp_path),
                '--device',
                'cpu',
                '--cfg-options',
                *options,
            ]
        )
        == 2
    )
    assert_one_line_error(capsys.readouterr().err, *fragments)


def test_unwritable_work_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    assert (
        exit_status(['--work-dir', str(blocker / 'work'), '--device', 'cpu'])
        == 2
    )
    assert_one_line_error(
        capsys.readouterr().err,
        'cannot write to work dir',
        str(blocker / 'work'),
    )


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert (
        exit_status(
            [
                '--work-dir',
                str(tmp_path),
                '--device',
                'cpu',
                '--resume-from',
                str(tmp_path / 'epoch_9.pth'),
                '--cfg-options',
                *SHORT,
            ]
        )
        == 2
    )
    assert_one_line_error(capsys.readouterr().err, 'checkpoint not found')


def test_bad_flag_is_one_line(capsys):
    assert exit_status(['--launcher', 'slurm']) == 2
    assert_one_line_error(capsys.readouterr().err, '--launcher')


def test_cfg_options_parse_as_on_the_command_line():
    # load_config takes what --cfg-options gives, or its key=value items.
    path = default_config_path()
    for options in (
        ['runner.max_epochs=3', 'model.widths=(8,16)'],
        {'runner.max_epochs': 3, 'model.widths': (8, 16)},
    ):
        cfg = load_config(path, options)
        assert cfg.runner.max_epochs == 3
        assert cfg.model.widths == (8, 16)


@MODELS.register_module(name='UsersBYOL', force=True)
class UsersBYOL(DigitsBYOL):
    """A user's model, registered in mmcv's root model registry."""


def test_models_build_from_mmcvs_root_registry():
    for name, cls in (
        ('momentum_hook.DigitsBYOL', DigitsBYOL),
        ('UsersBYOL', UsersBYOL),
    ):
        cfg = Config(dict(model=dict(type=name, widths=(4, 8))))
        assert type(build_model(cfg)) is cls


def test_default_config_is_found_from_the_installed_package():
    from importlib import resources

    from momentum_hook.demo.train import default_config_path

    installed = resources.files('momentum_hook.configs') / 'byol_digits.py'
    assert installed.is_file()
    assert osp.samefile(default_config_path(), str(installed))
    assert os.access(default_config_path(), os.R_OK)
