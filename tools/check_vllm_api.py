"""Check a vLLM's sources for every vLLM name the plugin imports, patches or subclasses: that it exists, and that
its signature is the one the plugin was written against (``tools/vllm_api.json``).

    python tools/check_vllm_api.py                       # the installed vLLM
    python tools/check_vllm_api.py --vllm /tmp/vllm033/src/vllm   # an unpacked wheel (never imported)
    python tools/check_vllm_api.py --record              # rewrite tools/vllm_api.json from the installed vLLM

Static: the plugin's sources and vLLM's are read with ``ast``, so a vLLM built for another platform (a CUDA wheel
on a CPU machine) can be checked without importing it. What it covers:

- imports: ``from vllm.x import Name`` (Name defined in, re-exported by, or lazily exported from vllm.x, or a
  submodule);
- patches: ``Name.attr = ...`` where Name is a vLLM module or class the plugin imported (attributes named
  ``mtp_gemma4*`` / ``_mtp*`` are the plugin's own additions and must not exist in vLLM);
- subclasses: each method a plugin class overrides on a vLLM base class;
- signatures (parameter names, kinds and which have defaults) of every function, method and class
  (``__init__``) among them. A name may list several signatures: each one a vLLM version has, read and found
  to work with the plugin's use of it.

Exit status 1, with one line per difference, when a name is missing or a signature changed.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vllm_mtp_gemma4"
EXPECTED = Path(__file__).with_name("vllm_api.json")
OWN_PREFIXES = ("mtp_gemma4", "_mtp")


@dataclass
class Module:
    path: Path
    tree: ast.Module
    names: dict[str, ast.AST] = field(default_factory=dict)  # top-level defs, classes, assignments
    imports: dict[str, str] = field(default_factory=dict)  # local name -> "module:attr" or "module"
    star_imports: list[str] = field(default_factory=list)
    getattr_names: set[str] = field(default_factory=set)


class VllmSources:
    """vLLM's package directory, read without importing it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[str, Module | None] = {}

    def module(self, dotted: str) -> Module | None:
        if dotted not in self.cache:
            parts = dotted.split(".")[1:]
            base = self.root.joinpath(*parts)
            path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            self.cache[dotted] = _parse(path, dotted) if path.is_file() else None
        return self.cache[dotted]

    def resolve(self, dotted: str, name: str, depth: int = 0) -> tuple[str, ast.AST | None] | None:
        """Where ``dotted.name`` is defined: (qualified name, its node; None for a module)."""
        if depth > 8:
            return None
        if self.module(f"{dotted}.{name}") is not None:
            return f"{dotted}.{name}", None
        module = self.module(dotted)
        if module is None:
            return None
        if name in module.names:
            return f"{dotted}.{name}", module.names[name]
        if name in module.imports:
            target = module.imports[name]
            if ":" in target:
                source, attr = target.split(":")
                return self.resolve(source, attr, depth + 1)
            return (target, None) if self.module(target) is not None else None
        lazy = _lazy_export(module, name)  # vllm/__init__.py's MODULE_ATTRS
        if lazy is not None:
            source, attr = lazy
            return self.resolve(source if source.startswith("vllm") else f"vllm{source}", attr, depth + 1)
        for source in module.star_imports:  # ``from .parallel_state import *``
            found = self.resolve(source, name, depth + 1)
            if found is not None:
                return found
        if name in module.getattr_names:  # a module ``__getattr__`` that answers ``name`` (``current_platform``)
            return f"{dotted}.{name}", ast.Constant(value=None)
        return None

    def member(self, qualified: str, node: ast.AST | None, attr: str) -> tuple[str, ast.AST | None] | None:
        """``attr`` of a module or class (a class's own body, then its bases', within vLLM)."""
        if node is None:
            return self.resolve(qualified, attr)
        if not isinstance(node, ast.ClassDef):
            return None
        for item in node.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name == attr:
                return f"{qualified}.{attr}", item
            if isinstance(item, ast.AnnAssign | ast.Assign) and attr in _targets(item):
                return f"{qualified}.{attr}", item
        module_name = qualified.rsplit(".", 1)[0]
        for base in node.bases:
            found = self.base_class(module_name, base)
            if found is not None:
                hit = self.member(*found, attr)
                if hit is not None:
                    return hit
        return None

    def base_class(self, module_name: str, base: ast.expr) -> tuple[str, ast.AST] | None:
        module = self.module(module_name)
        if module is None:
            return None
        if isinstance(base, ast.Name):
            found = self.resolve(module_name, base.id)
        elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id in module.imports:
            found = self.resolve(module.imports[base.value.id].replace(":", "."), base.attr)
        else:
            return None
        return found if found is not None and isinstance(found[1], ast.ClassDef) else None


def _parse(path: Path, dotted: str) -> Module:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = Module(path, tree)
    package = dotted if path.name == "__init__.py" else dotted.rsplit(".", 1)[0]
    for node in ast.walk(tree) if path.name == "__init__.py" else tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node in tree.body:
            module.names[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node in tree.body:
            for target in _targets(node):
                module.names[target] = node
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, package)
            for alias in node.names:
                if alias.name == "*":
                    module.star_imports.append(source)
                else:
                    module.imports[alias.asname or alias.name] = f"{source}:{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                module.imports[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                    alias.name.split(".")[0]
    getattr_function = module.names.get("__getattr__")
    if isinstance(getattr_function, ast.FunctionDef):
        module.getattr_names = {n.value for n in ast.walk(getattr_function)
                                if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    if path.name != "__init__.py":  # imports inside TYPE_CHECKING or try blocks of a module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(node, package)
                for alias in node.names:
                    if alias.name != "*":
                        module.imports.setdefault(alias.asname or alias.name, f"{source}:{alias.name}")
    return module


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _targets(node: ast.Assign | ast.AnnAssign) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _lazy_export(module: Module, name: str) -> tuple[str, str] | None:
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == name and isinstance(value, ast.Constant) \
                        and isinstance(value.value, str) and ":" in value.value:
                    source, attr = value.value.split(":")
                    return source, attr
    return None


def signature(node: ast.AST | None, sources: VllmSources, qualified: str) -> str:
    """``(a, b=, *args, c=, **kwargs)`` for a function; a class's ``__init__``; "module"/"attribute" otherwise."""
    if node is None:
        return "module"
    if isinstance(node, ast.ClassDef):
        init = sources.member(qualified, node, "__init__")
        if init is None or not isinstance(init[1], ast.FunctionDef):
            return "class"
        return "class" + signature(init[1], sources, init[0])
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return "attribute"
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    defaults = len(positional) - len(args.defaults)
    parts = [a.arg + ("=" if i >= defaults else "") for i, a in enumerate(positional)]
    if args.posonlyargs:
        parts.insert(len(args.posonlyargs), "/")
    if args.vararg:
        parts.append("*" + args.vararg.arg)
    elif args.kwonlyargs:
        parts.append("*")
    parts += [a.arg + ("=" if d is not None else "") for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        parts.append("**" + args.kwarg.arg)
    return ("async " if isinstance(node, ast.AsyncFunctionDef) else "") + "(" + ", ".join(parts) + ")"


def plugin_uses(sources: VllmSources) -> tuple[dict[str, str], list[str]]:
    """Every vLLM name the plugin's package imports, patches or subclasses -> its signature; and the problems."""
    uses: dict[str, str] = {}
    problems: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(REPO)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        local: dict[str, tuple[str, ast.AST | None]] = {}  # local name -> resolved vLLM name
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm" and not node.level:
                for alias in node.names:
                    found = sources.resolve(node.module, alias.name)
                    name = f"{node.module}.{alias.name}"
                    if found is None:
                        problems.append(f"{where}:{node.lineno}: {name}: not found")
                        continue
                    local[alias.asname or alias.name] = found
                    uses[name] = signature(found[1], sources, found[0])
        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    owner = _vllm_expr(sources, target.value, local) if isinstance(target, ast.Attribute) else None
                    if owner is not None:
                        check_member(sources, owner, target.attr, f"{where}:{node.lineno}", uses, problems)
            elif isinstance(node, ast.ClassDef):
                bases = [found for base in node.bases if (found := _vllm_expr(sources, base, local)) is not None]
                # the class's own methods and those of the plugin's mixins before it in the same file
                mixins = [classes[b.id] for b in node.bases if isinstance(b, ast.Name) and b.id in classes]
                for item in [item for cls in (node, *mixins) for item in cls.body]:
                    if not isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        continue
                    for base in bases:
                        if sources.member(*base, item.name) is not None:
                            check_member(sources, base, item.name, f"{where}:{item.lineno}", uses, problems)
                            break
    return uses, problems


def _vllm_expr(sources: VllmSources, expr: ast.expr, local: dict[str, tuple[str, ast.AST | None]]
               ) -> tuple[str, ast.AST | None] | None:
    """The vLLM module or class that ``expr`` (``name`` or ``name.attr...``) names, through the file's imports."""
    if isinstance(expr, ast.Name):
        return local.get(expr.id)
    if isinstance(expr, ast.Attribute):
        owner = _vllm_expr(sources, expr.value, local)
        return None if owner is None else sources.member(*owner, expr.attr)
    return None


def check_member(sources: VllmSources, owner: tuple[str, ast.AST | None], attr: str, where: str,
                 uses: dict[str, str], problems: list[str]) -> None:
    name = f"{owner[0]}.{attr}"
    found = sources.member(*owner, attr)
    if attr.startswith(OWN_PREFIXES):
        if found is not None:
            problems.append(f"{where}: {name}: the plugin adds this name, and vLLM now has one")
        return
    if found is None:
        problems.append(f"{where}: {name}: not found")
        return
    uses[name] = signature(found[1], sources, found[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm", type=Path, help="vLLM's package directory (default: the installed one)")
    parser.add_argument("--record", action="store_true", help=f"write {EXPECTED.name} from this vLLM")
    args = parser.parse_args()
    root = args.vllm
    if root is None:
        import importlib.util

        spec = importlib.util.find_spec("vllm")
        if spec is None or spec.origin is None:
            print("error: vLLM is not installed here; pass --vllm DIR", file=sys.stderr)
            return 2
        root = Path(spec.origin).parent
    version = _version(root)
    uses, problems = plugin_uses(VllmSources(root))
    if args.record and not problems:
        # a name may list several signatures the plugin was read against (another vLLM's, reviewed): kept
        known = json.loads(EXPECTED.read_text())["names"] if EXPECTED.is_file() else {}
        names = {n: known[n] if isinstance(known.get(n), list) and sig in known[n] else sig for n, sig in uses.items()}
        EXPECTED.write_text(json.dumps({"vllm": version, "names": names}, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(uses)} names from vLLM {version} in {EXPECTED.relative_to(REPO)}")
        return 0
    expected = json.loads(EXPECTED.read_text()) if not args.record else {"vllm": version, "names": uses}
    for name, sig in sorted(uses.items()):
        want = expected["names"].get(name)
        if want is None:
            problems.append(f"{name}: used by the plugin but not in {EXPECTED.name} (run --record against vLLM "
                            f"{expected['vllm']})")
        elif sig not in (want if isinstance(want, list) else [want]):
            problems.append(f"{name}: signature {sig}, written against {want} (vLLM {expected['vllm']})")
    print(f"vLLM {version} at {root}: {len(uses)} names the plugin imports, patches or subclasses; "
          f"{len(problems)} problem(s)")
    for problem in problems:
        print("  " + problem)
    return 1 if problems else 0


def _version(root: Path) -> str:
    version_file = root / "_version.py"
    if version_file.is_file():
        for node in ast.walk(ast.parse(version_file.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and any(
                    isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets):
                return str(node.value.value)
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
