"""A house rule as an import-linter contract: packages meet through their faces.

``make lint`` runs it (``[tool.importlinter] contract_types`` in ``pyproject.toml``). For every
``from raytorch.<...> import name`` in the package, where the importing module and the imported
one belong to different packages (``raytorch.core``, ``raytorch.engine.io``, ...,
``raytorch.cluster``, ``raytorch.jobs``):

- ``name`` must not start with ``_`` (an underscore name is a boundary not designed yet);
- when the imported package declares a face (``face(__name__, {...})`` in its ``__init__``,
  see ``raytorch.core.lazy``), ``name`` must be one of the names it declares.

Submodules imported by name (``from raytorch.engine import io``) are not names of a face.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


@dataclass(frozen=True)
class Violation:
    importer: str
    line: int
    imported: str
    name: str
    why: str

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.name!r} from {self.imported}: {self.why}"


def _root_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"cannot find the package {package!r}")
    return Path(next(iter(spec.submodule_search_locations)))


class Tree:
    """The package's modules, read from its files (nothing is imported)."""

    def __init__(self, root_package: str) -> None:
        self.root_package = root_package
        self.root = _root_dir(root_package)

    def path(self, module: str) -> Path | None:
        parts = module.split(".")[1:]
        base = self.root.joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def is_package(self, module: str) -> bool:
        path = self.path(module)
        return path is not None and path.name == "__init__.py"

    def package_of(self, module: str) -> str:
        return module if self.is_package(module) else module.rsplit(".", 1)[0]

    def modules(self) -> list[str]:
        found = []
        for file in sorted(self.root.rglob("*.py")):
            parts = file.relative_to(self.root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append(".".join((self.root_package, *parts)))
        return found

    def face(self, package: str) -> set[str] | None:
        """The names a package's face declares, or None when it declares no face."""
        path = self.path(package)
        if path is None or path.name != "__init__.py":
            return None
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "face"
                and len(node.args) == 2
                and isinstance(node.args[1], ast.Dict)
            ):
                names: set[str] = set()
                for value in node.args[1].values:
                    if isinstance(value, (ast.List, ast.Tuple)):
                        names |= {e.value for e in value.elts if isinstance(e, ast.Constant)}
                return names
        return None


def violations(root_package: str = "raytorch") -> list[Violation]:
    """Every import that breaks the rule, in file order."""
    tree = Tree(root_package)
    faces: dict[str, set[str] | None] = {}
    found = []
    for module in tree.modules():
        path = tree.path(module)
        assert path is not None
        mine = tree.package_of(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if node.module.split(".")[0] != root_package or tree.path(node.module) is None:
                continue
            target = tree.package_of(node.module)
            if target == mine:
                continue
            if target not in faces:
                faces[target] = tree.face(target)
            face = faces[target]
            for alias in node.names:
                name = alias.name
                if tree.path(f"{node.module}.{name}") is not None:
                    continue  # a submodule, imported by name
                if name.startswith("_") and not name.startswith("__"):
                    why = "an underscore name crosses a package boundary"
                elif face is not None and name not in face:
                    why = f"not declared by the face of {target} (its __init__)"
                else:
                    continue
                found.append(Violation(module, node.lineno, node.module, name, why))
    return found


class FacesContract(Contract):
    """Packages meet through their faces: no ``_`` name, and only declared names, cross."""

    type_name = "faces"

    root_package = fields.StringField()

    def check(self, graph: object, verbose: bool) -> ContractCheck:
        found = violations(str(self.root_package))
        return ContractCheck(kept=not found, metadata={"violations": [str(v) for v in found]})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["violations"]:
            output.print_error(line)
        output.new_line()
        output.print(
            "Declare the name in the imported package's face (its __init__), or make it public "
            "there, or move the code that needs it into that package."
        )
