"""Every private attribute and version check of another library, one module
per library: :mod:`.torch`, :mod:`.deepspeed`, :mod:`.mmengine`,
:mod:`.mmcv`.

Where a library has no public API for what the update needs (an FSDP1
unit's flat shard, a ZeRO-3 parameter's partition), the attribute is read
here and nowhere else, and a version that lacks it stops the run with an
error naming the attribute, the installed version and the range this
package is tested on (read from its installed metadata).
"""

import importlib.metadata
import re

__all__ = ['tested_range', 'release', 'missing_attribute']


def tested_range(distribution):
    """The version range of ``distribution`` that momentum_hook declares.

    Args:
        distribution (str): A requirement's name, e.g. ``'torch'``.

    Returns:
        str: Its specifier from momentum_hook's metadata (``'>=2.14,<2.16'``),
        or a pointer to ``pyproject.toml`` when momentum_hook runs from a
        source tree that is not installed.
    """
    try:
        requirements = importlib.metadata.requires('momentum_hook') or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    for requirement in requirements:
        match = re.match(r'\s*([A-Za-z0-9_.-]+)\s*([^;]*)', requirement)
        if match and match.group(1).lower() == distribution.lower():
            # Lower bounds first: '>=2.14,<2.16', as people write ranges.
            specifiers = sorted(
                (
                    part.strip()
                    for part in match.group(2).split(',')
                    if part.strip()
                ),
                key=lambda part: not part.startswith('>'),
            )
            return ','.join(specifiers) or ' (any version)'
    return "as pinned in momentum_hook's pyproject.toml"


def release(text):
    """A version string's release as a tuple: ``'0.19.6+abc'`` ->
    ``(0, 19, 6)``."""
    return tuple(
        int(part)
        for part in re.split(r'[+-]', text)[0].split('.')[:3]
        if part.isdigit()
    )


def missing_attribute(library, version, owner, name):
    """The error for a private attribute ``owner.name`` of ``library`` that
    its installed ``version`` lacks."""
    return RuntimeError(
        f"momentum_hook reads {library}'s {owner}.{name}, which {library} "
        f'{version} does not have: use a {library} version within '
        f"momentum_hook's tested range ({library}"
        f'{tested_range(library)})'
    )
