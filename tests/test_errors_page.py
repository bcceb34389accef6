"""docs/errors.md against the code: every message it quotes exists in the
package, and every error and warning the package raises with a message is
quoted there.

A message in the code is a *template*: the literal text of its string or
f-string, with a wildcard for each formatted value (module-level string
constants such as ``QUANTIZED`` are spelled out). A quote on the page is an
example: its values are examples and ``...`` leaves text out. A quote
*matches* a template when each of its ``...``-separated fragments is a
rendering (or the part of one) of the template's consecutive text, with any
text standing in for a wildcard, where at least a quarter of the
fragment's characters (or of the template's literal text, if that is
shorter), and at least 12, are the template's literal text (so a quote of
values alone matches nothing).

*Documented* means: for a ``raise SomeError(<message>)`` (or a returned
error, a ``warnings.warn`` or a ``logger.warning``) in ``momentum_hook/``
or ``momentum_hook_dropin.py`` whose first argument is a string or an
f-string, errors.md has a quote, in backticks in a table row, that matches
its template and names the same class (``ValueError: ...``; warnings and
log messages name ``UserWarning`` or nothing). Errors whose message is a
variable (a re-raised or wrapped error) are covered by the quote of the
error they carry.
"""

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / 'docs' / 'errors.md'
SOURCES = sorted((ROOT / 'momentum_hook').rglob('*.py')) + [
    ROOT / 'momentum_hook_dropin.py'
]

#: Raises that errors.md does not list, each with the reason, keyed by
#: ``(path relative to the root, the start of the message's literal text)``.
EXEMPT = {
    ('momentum_hook/__init__.py', 'module '): (
        "Python's own wording for a missing module attribute"
    ),
    ('momentum_hook/model.py', 'momentum_target_master'): (
        "Python's own wording for a missing attribute: a model without a "
        'target has no master keys to walk'
    ),
}

#: A quote in a table row: `ErrorName: text` or `text`, first cell.
_QUOTE = re.compile(
    r'^\| `(?:(?P<kind>[A-Za-z]+(?:Error|Warning)): )?'
    r'(?P<text>[^`]+)`'
)
_WILD = None  # a formatted value in a template's pieces


def quotes():
    """``[(kind or None, text)]`` of the first cell of each table row."""
    found = []
    for line in PAGE.read_text(encoding='utf-8').splitlines():
        match = _QUOTE.match(line)
        if match:
            found.append((match.group('kind'), match.group('text')))
    return found


def _constants(tree):
    """The module-level string constants of ``tree``: name -> node."""
    found = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            found[node.targets[0].id] = node.value
    return found


def _pieces(node, constants, depth=0):
    """A string expression as a list of literal strings and ``_WILD``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        pieces = []
        for value in node.values:
            pieces += _pieces(value, constants, depth)
        return pieces
    if isinstance(node, ast.FormattedValue):
        inner = node.value
        if (
            isinstance(inner, ast.Name)
            and inner.id in constants
            and node.conversion == -1
            and node.format_spec is None
            and depth < 3
        ):
            resolved = _pieces(constants[inner.id], constants, depth + 1)
            if resolved is not None:
                return resolved
        return [_WILD]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left = _pieces(node.left, constants, depth)
        right = _pieces(node.right, constants, depth)
        if left is not None and right is not None:
            return left + right
    return None


def _normalise(pieces):
    """Alternating ``[literal, literal, ...]`` with one wildcard between each
    two: adjacent literals joined, adjacent wildcards merged."""
    literals, current = [], ''
    for piece in pieces:
        if piece is _WILD:
            literals.append(current)
            current = ''
        else:
            current += piece
    literals.append(current)
    return literals


def _percent_placeholders(pieces):
    """``pieces`` with each ``%s``/``%r``/``%d`` of a logging message's
    literal text as a wildcard."""
    out = []
    for piece in pieces:
        if piece is _WILD:
            out.append(piece)
            continue
        for index, part in enumerate(re.split(r'%[sdr]', piece)):
            if index:
                out.append(_WILD)
            out.append(part)
    return out


def _call_name(node):
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


@functools.cache
def templates():
    """``(messages, raises)``: every string template in the package, and
    ``[(path, line, kind, literals)]`` of each error or warning raised with
    a message."""
    messages, raises = [], []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding='utf-8'))
        constants = _constants(tree)
        relative = path.relative_to(ROOT).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, (ast.JoinedStr, ast.Constant)):
                pieces = _pieces(node, constants)
                if pieces and any(p for p in pieces if p is not _WILD):
                    messages.append(_normalise(pieces))
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = _call_name(node)
            if not name or not (
                name.endswith(('Error', 'Warning'))
                or name in ('warn', 'warning')
            ):
                continue
            pieces = _pieces(node.args[0], constants)
            if pieces is None or not any(p for p in pieces if p is not _WILD):
                continue  # a variable: a carried or re-raised message
            if name == 'warning':  # logging: %-placeholders are values
                pieces = _percent_placeholders(pieces)
            literals = _normalise(pieces)
            messages.append(literals)
            kind = 'UserWarning' if name in ('warn', 'warning') else name
            raises.append((relative, node.lineno, kind, literals))
    return messages, raises


def _from_wildcard(text, literals, index):
    """The most literal characters ``text`` can match when it starts inside
    the value before ``literals[index]``; -1 if it cannot match."""
    best = 0  # all of text is the value
    if index >= len(literals):
        return best
    literal = literals[index]
    last = index == len(literals) - 1
    if not literal:
        return max(best, _from_wildcard(text, literals, index + 1))
    start = text.find(literal)
    while start >= 0:
        rest = text[start + len(literal) :]
        if last:
            if not rest:
                best = max(best, len(literal))
        else:
            more = _from_wildcard(rest, literals, index + 1)
            if more >= 0:
                best = max(best, len(literal) + more)
        start = text.find(literal, start + 1)
    for cut in range(len(text)):  # text ends inside this literal
        if literal.startswith(text[cut:]):
            best = max(best, len(text) - cut)
            break
    return best


def literal_share(fragment, literals):
    """The most characters of ``fragment`` that are the template's literal
    text, over every way it can be (part of) a rendering; -1 if none."""
    best = -1
    for index, literal in enumerate(literals):
        if fragment in literal:
            return len(fragment)
        if index > 0:  # starts inside the value before this literal
            best = max(best, _from_wildcard(fragment, literals, index))
        for cut in range(1, len(literal)):  # starts inside this literal
            suffix = literal[cut:]
            if fragment.startswith(suffix):
                more = (
                    _from_wildcard(
                        fragment[len(suffix) :], literals, index + 1
                    )
                    if index + 1 < len(literals)
                    else (0 if fragment == suffix else -1)
                )
                if more >= 0:
                    best = max(best, len(suffix) + more)
                break
        if fragment.startswith(literal) and literal:
            if index + 1 < len(literals):
                more = _from_wildcard(
                    fragment[len(literal) :], literals, index + 1
                )
                best = max(best, len(literal) + more)
    return best


def matches(quote, literals):
    """Whether a quote (``...`` for left-out text) matches a template."""
    fragments = [part.strip() for part in quote.split('...')]
    fragments = [part for part in fragments if part]
    own = sum(map(len, literals))
    return bool(fragments) and all(
        share * 4 >= min(len(part), own) and share >= min(len(part), 12)
        for part in fragments
        for share in [literal_share(part, literals)]
    )


def test_the_matcher_tells_a_rendering_from_other_text():
    literals = _normalise(
        ['', _WILD, ' must be a real number in [0, 1], got ', _WILD, '']
    )
    assert matches(
        'end_momentum must be a real number in [0, 1], got 1.5', literals
    )
    assert matches('momentum must be a real number ...', literals)
    assert not matches(
        'end_momentum must be a number in [0, 1], got 1.5', literals
    )
    assert not matches('end_momentum', literals)  # values only
    assert not matches(
        'end_momentum must be a real number in [0, 1] got 1.5', literals
    )  # the comma
    assert matches(
        'got 1.5 must be a real number in [0, 1]', literals
    )  # a name that reads 'got 1.5'


@pytest.mark.parametrize(
    'kind, quote', quotes(), ids=lambda value: str(value)[:40]
)
def test_every_quoted_message_exists_in_the_package(kind, quote):
    messages, _ = templates()
    assert any(matches(quote, literals) for literals in messages), (
        f'docs/errors.md quotes a message the package does not have: {quote!r}'
    )


def test_every_raised_message_is_on_the_errors_page():
    _, raises = templates()
    page = quotes()
    missing = []
    for path, line, kind, literals in raises:
        if any(
            path == exempt and literals[0].startswith(start)
            for exempt, start in EXEMPT
        ):
            continue
        documented = any(
            matches(quote, literals)
            and (quoted == kind or quoted is None and kind == 'UserWarning')
            for quoted, quote in page
        )
        if not documented:
            missing.append(
                f'{path}:{line} {kind}: {"{...}".join(literals)[:100]}'
            )
    assert not missing, 'raised but not on docs/errors.md:\n' + '\n'.join(
        missing
    )
