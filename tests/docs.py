"""The commands and Python snippets printed in README.md, BUILD.md, BENCHMARKS.md,
ARCHITECTURE.md and the pages of docs/.

    documented_commands()  -> [Command(doc, line, text)], shell commands in document order
    documented_snippets()  -> [Command(doc, line, text)], Python code blocks

A shell command is a line of a code block (indented by 4+ spaces or inside ``` fences),
or an `inline code` span, that starts with python, python3, pip, curl, docker, .ci/run,
`export NAME=` or `NAME=... python`; lines ending in a backslash are joined with the
next, and a trailing `# comment` after two spaces is dropped. A Python snippet is an
indented or fenced code block whose first line starts with `import` or `from`.
"""

import dataclasses
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "BUILD.md", "BENCHMARKS.md", "ARCHITECTURE.md") + tuple(sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))))
COMMAND_START = re.compile(r"^(python3? |pip |curl |docker |\.ci/run|export [A-Z_]+=|"
                           r"[A-Z_]+='.*' *\\?$|[A-Z_]+=\S+ python)")
COMMENT = re.compile(r"\s{2,}#\s.*$")


@dataclasses.dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str


def _code_lines(path):
    """(line number, text, block id) of every code-block line, indentation removed."""
    out, fenced, block, prev_blank, in_indented = [], False, 0, True, False
    with open(path) as f:
        rows = f.read().splitlines()
    for number, raw in enumerate(rows, 1):
        if raw.strip().startswith("```"):
            fenced = not fenced
            block += 1
            continue
        if fenced:
            out.append((number, raw, block))
            continue
        indented = raw.startswith("    ") and raw.strip()
        if indented and (prev_blank or in_indented):
            if not in_indented:
                block += 1
            in_indented = True
            out.append((number, raw, block))
        elif raw.strip():
            in_indented = False
        prev_blank = not raw.strip()
    return out


def _dedent(lines):
    width = min(len(t) - len(t.lstrip()) for _, t, _ in lines if t.strip())
    return [(n, t[width:], b) for n, t, b in lines]


def documented_commands(docs=DOCS, root=ROOT):
    commands = []
    for doc in docs:
        path = os.path.join(root, doc)
        lines = _code_lines(path)
        i = 0
        while i < len(lines):
            number, text, block = lines[i]
            text = text.strip()
            if COMMAND_START.match(text):
                while text.endswith("\\") and i + 1 < len(lines) and lines[i + 1][2] == block:
                    i += 1
                    text = text[:-1].rstrip() + " " + lines[i][1].strip()
                commands.append(Command(doc, number, COMMENT.sub("", text).strip()))
            i += 1
        with open(path) as f:
            for number, row in enumerate(f, 1):
                if row.startswith("    "):
                    continue
                commands.extend(Command(doc, number, span.strip())
                                for span in re.findall(r"`([^`]+)`", row)
                                if COMMAND_START.match(span) and not span.startswith("export "))
    return commands


def documented_snippets(docs=DOCS, root=ROOT):
    snippets = []
    for doc in docs:
        blocks = {}
        for number, text, block in _code_lines(os.path.join(root, doc)):
            blocks.setdefault(block, []).append((number, text, block))
        for lines in blocks.values():
            lines = _dedent(lines)
            if re.match(r"^(import|from) \w", lines[0][1]):
                snippets.append(Command(doc, lines[0][0], "\n".join(t for _, t, _ in lines)))
    return snippets
