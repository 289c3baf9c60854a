"""Data in and out, in one process: inputs as checked ``Source`` values, the Arrow <-> tensor
codec, rows into ``(inputs, targets)``, state files, and file systems with atomic writes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raytorch.core.lazy import face

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from raytorch.engine.io.arrow import (
        batch_columns,
        column_to_numpy,
        column_values,
        row_columns,
        row_items,
        table_to_tensors,
        tables_to_tensors,
        tensor_column,
        to_table,
        to_tensor,
    )
    from raytorch.engine.io.claims import (
        Claim,
        read_holder,
    )
    from raytorch.engine.io.download import (
        Download,
        download,
    )
    from raytorch.engine.io.fs import (
        DEFAULT_JOB_STORAGE,
        RAY_JOB_ENV,
        atomic_dir,
        atomic_write,
        check_store,
        check_stores,
        download_dir,
        in_temporary_job_dir,
        is_remote,
        is_uri,
        join,
        lasting_path,
        leftovers,
        overlaps,
        read_bytes,
        read_json_file,
        resolve,
        store_endpoint,
        store_problem,
        stores_checked,
        upload_dir,
        write_bytes,
        write_error,
    )
    from raytorch.engine.io.interrupts import (
        deferred_interrupts,
        raise_on_sigterm,
        raising_on_sigterm,
        was_terminated,
    )
    from raytorch.engine.io.rows import (
        IN_COLUMN,
        TARGET_COLUMN,
        ArrowCollate,
        RowMap,
        assemble,
        check_finite,
        nonfinite_problem,
    )
    from raytorch.engine.io.sources import (
        ACCEPTED,
        id_ranges,
        list_parquet,
        mapped_table,
        open_source,
        read_column,
        read_row_groups,
        read_table,
        table_fingerprint,
    )
    from raytorch.engine.io.state import (
        from_json_value,
        load_state,
        read_json,
        reference_for,
        save_state,
        to_json_value,
        write_json,
    )
    from raytorch.engine.io.tables import (
        check_columns,
        check_counts,
        check_source,
        check_types,
        check_values,
        table_holdout,
    )

# What the layers above may use, by module (imported on first use).
__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "interrupts": [
            "deferred_interrupts",
            "raise_on_sigterm",
            "raising_on_sigterm",
            "was_terminated",
        ],
        "claims": [
            "Claim",
            "read_holder",
        ],
        "arrow": [
            "batch_columns",
            "column_to_numpy",
            "column_values",
            "row_columns",
            "row_items",
            "table_to_tensors",
            "tables_to_tensors",
            "tensor_column",
            "to_table",
            "to_tensor",
        ],
        "download": [
            "Download",
            "download",
        ],
        "fs": [
            "DEFAULT_JOB_STORAGE",
            "RAY_JOB_ENV",
            "atomic_dir",
            "atomic_write",
            "check_store",
            "check_stores",
            "download_dir",
            "in_temporary_job_dir",
            "is_remote",
            "is_uri",
            "join",
            "lasting_path",
            "leftovers",
            "overlaps",
            "read_bytes",
            "read_json_file",
            "resolve",
            "store_endpoint",
            "store_problem",
            "stores_checked",
            "upload_dir",
            "write_bytes",
            "write_error",
        ],
        "rows": [
            "IN_COLUMN",
            "TARGET_COLUMN",
            "ArrowCollate",
            "RowMap",
            "assemble",
            "check_finite",
            "nonfinite_problem",
        ],
        "sources": [
            "ACCEPTED",
            "id_ranges",
            "list_parquet",
            "mapped_table",
            "open_source",
            "read_column",
            "read_row_groups",
            "read_table",
            "table_fingerprint",
        ],
        "state": [
            "from_json_value",
            "load_state",
            "read_json",
            "reference_for",
            "save_state",
            "to_json_value",
            "write_json",
        ],
        "tables": [
            "check_columns",
            "check_counts",
            "check_source",
            "check_types",
            "check_values",
            "table_holdout",
        ],
    },
)
