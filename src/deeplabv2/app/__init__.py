"""Looking at results: the static evaluation report (:mod:`.report`) and the local web app of
``deeplabv2 serve`` (:mod:`.server`). Their HTML, JavaScript and CSS live in ``assets/`` and
ship inside the package: nothing is fetched from the network when a page opens."""

from importlib import resources


def asset(name: str) -> str:
    """The text of ``assets/NAME`` (a fixed file of this package, never a client's path)."""
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")
