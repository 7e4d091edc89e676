"""The README's bad-input table, generated from the tests: the first docstring line of each test in
``BAD_INPUT_TESTS`` reads "input -> what happens".

``python Testing/bad_input_table.py`` rewrites the table in README.md between its markers;
``test_bad_input.py::test_readme_table_is_generated_from_the_tests`` checks that it is current.
"""
from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
BAD_INPUT_TESTS = ("test_bad_input.py", "test_training_faults.py")
START, END = "<!-- bad-input-table:start -->", "<!-- bad-input-table:end -->"


def table() -> str:
    rows = ["| input | what happens | test |", "|---|---|---|"]
    for name in BAD_INPUT_TESTS:
        tree = ast.parse((HERE / name).read_text(encoding="utf-8"))
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if node.__class__ is ast.FunctionDef and node.name.startswith("test_") and doc:
                first = doc.strip().splitlines()[0]
                if "->" in first:
                    left, right = (t.strip().replace("|", "\\|") for t in first.split("->", 1))
                    rows.append(f"| {left} | {right} | `{name}::{node.name}` |")
    return "\n".join(rows)


def readme_block(text: str) -> str:
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def write_readme() -> None:
    text = README.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{START}\n{table()}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    write_readme()
