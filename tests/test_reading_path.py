"""The reader's path the README promises: five story files, each with one marked line after which a
first reading can stop, at most 1,200 lines above those lines in all, formatted like every other line
(no `# fmt:` exemption on the story), and modules in layers without an import cycle (function-level
imports included)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORY = ("recipe.py", "model.py", "train.py", "data.py", "evaluate.py")
PROJECT = {path.stem for path in REPO.glob("*.py")}


def test_each_story_file_has_one_marker_and_the_path_stays_short():
    above = 0
    for name in STORY:
        lines = (REPO / name).read_text().splitlines()
        markers = [number for number, line in enumerate(lines) if line.startswith("# Below this line")]
        assert len(markers) == 1, f"{name}: {len(markers)} lines begin '# Below this line'"
        above += markers[0]
        exempt = [number + 1 for number, line in enumerate(lines) if "# fmt:" in line]
        assert not exempt, (
            f"{name}: `# fmt:` exemptions on lines {exempt}; the story is formatted as all code is"
        )
    assert above <= 1200, f"{above} lines above the markers: the README's reading path promises at most 1,200"


def project_imports(path):
    """The project's modules a file imports, anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & (PROJECT | {"tools"})


def test_the_leaves_import_nothing_of_the_project_and_nothing_imports_in_a_circle():
    graph = {name: project_imports(REPO / f"{name}.py") - {name} for name in PROJECT}
    upward = sorted(name for name, imports in graph.items() if "tools" in imports)
    assert not upward, f"{upward} import tools/: tools/ imports the project, never the other way round"
    leaves = ("model", "recipe", "opencv_arithmetic", "layouts")
    assert all(graph[name] == set() for name in leaves), {name: graph[name] for name in leaves}
    assert graph["data"] <= {"recipe", "runtime", "opencv_arithmetic", "layouts"} and graph["runtime"] <= {
        "recipe"
    }

    def reaches(start, goal, seen=()):
        return any(
            step == goal or (step not in seen and reaches(step, goal, (*seen, step))) for step in graph[start]
        )

    circles = sorted(name for name in PROJECT if reaches(name, name))
    assert not circles, f"import circles through {circles}: {graph}"
