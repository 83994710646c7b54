"""The train config: one YAML file, typed and validated, every field overridable on the command line.

The schema is a tree of dataclasses. Each field carries its help text in `metadata["help"]`, so the
same definition drives validation, `leantune train --help` and the resolved `config.yaml` saved into
every run folder. The sections of the fine-tuning methods (lora, ia3, freeze, ...) are declared in each
method's own file and registered here as it is imported (`register_method`), with the method names.
Validation is strict: an unknown key is an error that names the closest valid key ("did you mean
lora.rank?"), and a value of the wrong type names the type it should have.

No heavy imports here: the CLI builds its help from this module in milliseconds (the built-in methods'
sections from a light table, leantune/cli/method_help.py, since importing the methods imports torch).

One concept a module: schema.py (the dataclasses and the methods' registry), fields.py (the flat field
list behind --help and overrides), validate.py (plain data to a checked RunConfig), files.py (YAML in and
out). Everything is imported from here, `leantune.config`, as before.
"""

from __future__ import annotations

from .schema import (  # noqa: F401  (the package's names, as when it was one module)
    DataConfig, DistributedConfig, GaloreConfig, METHODS, MethodInfo, QUANT_BLOCKSIZES, QuantConfig, RunConfig,
    SECTIONS, Section, SourceConfig, TrainConfig, option, register_method,
)
from .fields import (  # noqa: F401  (the package's names, as when it was one module)
    FieldInfo, fields_of, method_help, section_title, type_name,
)
from .validate import (  # noqa: F401  (the package's names, as when it was one module)
    ALIASES, check_data, check_quant, from_dict, need, normalise_targets, set_dotted, unknown_key_error,
)
from .files import (  # noqa: F401  (the package's names, as when it was one module)
    dump_yaml, load, load_yaml, to_dict,
)
