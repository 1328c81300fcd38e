//! pagewise lab tools.
