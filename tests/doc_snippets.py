"""The code blocks of the README and of docs/, by page and heading, so that
tests run the examples where users read them; not a test module."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The README and every page under docs/, the files whose links are checked.
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]

_HEADING = re.compile(r'^(#{1,6}) (.+?)\s*$')
_FENCE = re.compile(r'^```')


def sections(text):
    """``[(level, title, body)]`` of a Markdown text, headings inside code
    blocks ignored; ``body`` runs to the next heading of any level."""
    found, fenced = [[0, '', []]], False
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            fenced = not fenced
        match = None if fenced else _HEADING.match(line)
        if match:
            found.append([len(match.group(1)), match.group(2), []])
        else:
            found[-1][2].append(line)
    return [(level, title, ''.join(body)) for level, title, body in found]


def section(page, heading):
    """The text under ``heading`` in ``page`` (relative to the repository
    root), subsections included."""
    parts = sections((ROOT / page).read_text(encoding='utf-8'))
    for index, (level, title, body) in enumerate(parts):
        if title == heading:
            text = [body]
            for deeper, sub, sub_body in parts[index + 1 :]:
                if deeper <= level:
                    break
                text.append(f'{"#" * deeper} {sub}\n{sub_body}')
            return ''.join(text)
    raise LookupError(f'{page} has no heading {heading!r}')


def code_block(page, heading, language='python', containing=''):
    """The first ``language`` block under ``heading`` in ``page`` that
    contains ``containing``."""
    blocks = [
        block
        for block in re.findall(
            rf'^```{language}\n(.*?)^```', section(page, heading), re.S | re.M
        )
        if containing in block
    ]
    if not blocks:
        raise LookupError(
            f'{page}, {heading!r}: no ```{language} block '
            f'containing {containing!r}'
        )
    return blocks[0]


def slug(title):
    """GitHub's anchor for a heading: lower case, punctuation dropped,
    spaces to hyphens."""
    title = re.sub(r'`|\*\*|\[([^\]]*)\]\([^)]*\)', r'\1', title).lower()
    return re.sub(r'[^\w\- ]', '', title).replace(' ', '-')


def anchors(path):
    """The anchors of a Markdown file's headings, duplicates numbered."""
    seen, result = {}, set()
    for level, title, _ in sections(path.read_text(encoding='utf-8')):
        if not level:
            continue
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if not count else f'{base}-{count}')
    return result


def relative_links(path):
    """``[(target, anchor)]`` of the links in a Markdown file that point into
    the repository (not ``http(s):``/``mailto:``), outside code blocks."""
    text, links, fenced = path.read_text(encoding='utf-8'), [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        line = re.sub(r'`[^`]*`', '', line)  # code spans are not links
        for target in re.findall(r'\]\(([^)\s]+)\)', line):
            if re.match(r'[a-z][a-z0-9+.-]*:', target):
                continue
            file, _, anchor = target.partition('#')
            links.append((file, anchor))
    return links
