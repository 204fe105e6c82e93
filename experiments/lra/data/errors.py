"""The one error type every loader raises for missing or malformed data files."""


class DataLayoutError(FileNotFoundError):
    """A data file is missing or malformed; the message names it and the expected layout."""

    def __init__(self, problem: str, path, expected_layout: str):
        self.path = str(path)
        super().__init__(
            f"{problem}: {path}\n"
            f"Expected layout under the data root:\n{expected_layout}\n"
            "Nothing is downloaded at run time; experiments/README.md says where to get it."
        )
