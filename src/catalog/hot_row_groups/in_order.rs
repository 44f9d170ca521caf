//! The rows of a decoded row group that a comparison with a constant keeps,
//! found by binary search in a column the row group holds in order.
//!
//! A lookup's filter keeps a row or a few of a row group's hundred thousand;
//! evaluated over the row group whole, it compares every row of each column
//! it names, then filters every column read. Files are often written in the
//! order of their key, and a column chunk that holds its values in
//! ascending order (checked once, when it is decoded) answers
//! `column op constant` with one run of rows, found in logarithmic time.
//! The filters are then evaluated over that run alone: the rows outside it
//! fail one of them for certain.

use std::cmp::Ordering;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, make_comparator};
use arrow::compute::SortOptions;
use arrow::compute::kernels::cmp::lt_eq;
use arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
use datafusion::physical_expr::utils::split_conjunction;

/// Whether `values` holds no nulls and each value is at most the next, in
/// a type whose order the engine's comparisons share.
pub(super) fn ascending(values: &dyn Array) -> bool {
    if values.null_count() > 0 || !ordered_alike(values.data_type()) {
        return false;
    }
    let Some(pairs) = values.len().checked_sub(1) else {
        return true;
    };
    lt_eq(&values.slice(0, pairs), &values.slice(1, pairs))
        .is_ok_and(|at_most_next| at_most_next.true_count() == pairs)
}

/// Types whose values the comparator orders as the engine's `=`, `<` and
/// `>` compare them. Floating point is left out (`-0.0 = 0.0` and NaN).
fn ordered_alike(data_type: &DataType) -> bool {
    use DataType::*;
    matches!(
        data_type,
        Int8 | Int16
            | Int32
            | Int64
            | UInt8
            | UInt16
            | UInt32
            | UInt64
            | Decimal32(..)
            | Decimal64(..)
            | Decimal128(..)
            | Decimal256(..)
            | Date32
            | Date64
            | Time32(_)
            | Time64(_)
            | Timestamp(..)
            | Utf8
            | LargeUtf8
            | Utf8View
    )
}

/// The run of `rows` that `predicate`'s comparisons of a column with a
/// constant (`=`, `<`, `<=`, `>`, `>=`, joined by AND) keep, where
/// `ascending(i)` tells the column of index `i` in `columns` is held in
/// order: every row outside the run fails `predicate`. All of `rows` when
/// no comparison narrows them.
pub(super) fn rows_kept(
    predicate: &Arc<dyn PhysicalExpr>,
    columns: &[ArrayRef],
    ascending: impl Fn(usize) -> bool,
    rows: usize,
) -> Range<usize> {
    let mut kept = 0..rows;
    for conjunct in split_conjunction(predicate) {
        let Some((index, op, constant)) = comparison(conjunct) else {
            continue;
        };
        let Some(values) = columns.get(index).filter(|_| ascending(index)) else {
            continue;
        };
        if let Some(run) = run(values.as_ref(), op, constant) {
            kept = kept.start.max(run.start)..kept.end.min(run.end);
        }
    }
    kept.start.min(kept.end)..kept.end
}

/// `expr` as `column op constant`: the column's index, the operator and
/// the constant (a comparison written the other way round is turned).
fn comparison(expr: &Arc<dyn PhysicalExpr>) -> Option<(usize, Operator, &ScalarValue)> {
    let binary = expr.downcast_ref::<BinaryExpr>()?;
    let (left, right) = (binary.left(), binary.right());
    if let (Some(column), Some(constant)) = (
        left.downcast_ref::<Column>(),
        right.downcast_ref::<Literal>(),
    ) {
        return Some((column.index(), *binary.op(), constant.value()));
    }
    let column = right.downcast_ref::<Column>()?;
    let constant = left.downcast_ref::<Literal>()?;
    Some((column.index(), binary.op().swap()?, constant.value()))
}

/// The rows of ascending `values` that `values[i] op constant` keeps; `None`
/// for an operator or a constant this cannot answer.
fn run(values: &dyn Array, op: Operator, constant: &ScalarValue) -> Option<Range<usize>> {
    if constant.is_null() {
        return None;
    }
    let constant = constant.to_array().ok()?;
    if constant.data_type() != values.data_type() {
        return None;
    }
    let compare = make_comparator(values, constant.as_ref(), SortOptions::default()).ok()?;
    let rows = values.len();
    let below = |i: usize| compare(i, 0) == Ordering::Less;
    let at_most = |i: usize| compare(i, 0) != Ordering::Greater;
    Some(match op {
        Operator::Eq => partition_point(rows, below)..partition_point(rows, at_most),
        Operator::Lt => 0..partition_point(rows, below),
        Operator::LtEq => 0..partition_point(rows, at_most),
        Operator::Gt => partition_point(rows, at_most)..rows,
        Operator::GtEq => partition_point(rows, below)..rows,
        _ => return None,
    })
}

/// The first index of `0..rows` where `holds` is false, for a `holds` that
/// is true up to some index and false from there on.
fn partition_point(rows: usize, holds: impl Fn(usize) -> bool) -> usize {
    let (mut low, mut high) = (0, rows);
    while low < high {
        let middle = low + (high - low) / 2;
        if holds(middle) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    low
}

#[cfg(test)]
mod tests {
    use arrow::array::{Float64Array, Int64Array, StringViewArray};
    use arrow::datatypes::{Field, Schema};
    use datafusion::common::DFSchema;
    use datafusion::logical_expr::Expr;
    use datafusion::prelude::{SessionContext, col, lit};

    use super::*;

    fn keys() -> ArrayRef {
        Arc::new(Int64Array::from(vec![1, 2, 2, 2, 5, 8, 8, 13]))
    }

    fn names() -> ArrayRef {
        Arc::new(StringViewArray::from(vec![
            "ant", "bee", "cat", "cow", "dog", "eel", "fox", "gnu",
        ]))
    }

    /// The run `filter` keeps over `key` (ascending) and `name` (held in
    /// order or not, as `names_in_order` says).
    fn kept(filter: Expr, names_in_order: bool) -> Range<usize> {
        let schema = Schema::new(vec![
            Field::new("key", DataType::Int64, false),
            Field::new("name", DataType::Utf8View, false),
        ]);
        let predicate = SessionContext::new()
            .state()
            .create_physical_expr(filter, &DFSchema::try_from(schema).unwrap())
            .unwrap();
        rows_kept(
            &predicate,
            &[keys(), names()],
            |i| i == 0 || names_in_order,
            8,
        )
    }

    #[test]
    fn a_column_in_order_is_recognised() {
        assert!(ascending(keys().as_ref()));
        assert!(ascending(names().as_ref()));
        assert!(ascending(&Int64Array::from(Vec::<i64>::new())));
        assert!(!ascending(&Int64Array::from(vec![1, 3, 2])));
        assert!(!ascending(&Int64Array::from(vec![Some(1), None, Some(3)])));
        assert!(!ascending(&StringViewArray::from(vec!["b", "a"])));
        // Floating point is never taken as in order: its equality is not
        // the comparator's.
        assert!(!ascending(&Float64Array::from(vec![-0.0, 0.0, 1.0])));
    }

    #[test]
    fn each_comparison_keeps_the_run_of_rows_that_pass_it() {
        assert_eq!(kept(col("key").eq(lit(2_i64)), false), 1..4);
        assert_eq!(kept(lit(2_i64).eq(col("key")), false), 1..4);
        assert_eq!(kept(col("key").lt(lit(5_i64)), false), 0..4);
        assert_eq!(kept(col("key").lt_eq(lit(5_i64)), false), 0..5);
        assert_eq!(kept(col("key").gt(lit(5_i64)), false), 5..8);
        assert_eq!(kept(lit(5_i64).lt(col("key")), false), 5..8);
        assert_eq!(kept(col("key").gt_eq(lit(8_i64)), false), 5..8);
        // Constants before, between and past the values.
        assert_eq!(kept(col("key").eq(lit(0_i64)), false), 0..0);
        assert_eq!(kept(col("key").eq(lit(3_i64)), false), 4..4);
        assert_eq!(kept(col("key").eq(lit(99_i64)), false), 8..8);
        assert_eq!(kept(col("key").gt(lit(99_i64)), false), 8..8);
    }

    #[test]
    fn comparisons_joined_by_and_keep_the_rows_all_of_them_keep() {
        let between = col("key")
            .gt_eq(lit(2_i64))
            .and(col("key").lt_eq(lit(8_i64)));
        assert_eq!(kept(between, false), 1..7);
        let disjoint = col("key").lt(lit(2_i64)).and(col("key").gt(lit(5_i64)));
        assert!(kept(disjoint, false).is_empty());
        let dog = lit(ScalarValue::Utf8View(Some("dog".into())));
        let two_columns = col("key").gt(lit(1_i64)).and(col("name").lt(dog));
        assert_eq!(kept(two_columns.clone(), true), 1..4);
        // A column not in order narrows nothing.
        assert_eq!(kept(two_columns, false), 1..8);
    }

    #[test]
    fn what_cannot_be_answered_by_order_keeps_every_row() {
        // OR, a cast column, a null, an operator other than a comparison.
        let either = col("key").eq(lit(1_i64)).or(col("key").eq(lit(8_i64)));
        assert_eq!(kept(either, false), 0..8);
        assert_eq!(kept(col("key").not_eq(lit(2_i64)), false), 0..8);
        let null = col("key").eq(lit(ScalarValue::Int64(None)));
        assert_eq!(kept(null, false), 0..8);
        let cast = Expr::Cast(datafusion::logical_expr::Cast::new(
            Box::new(col("key")),
            DataType::Utf8,
        ))
        .eq(lit("2"));
        assert_eq!(kept(cast, false), 0..8);
        // A constant of another type than the column's (planning casts one
        // to the other's type first).
        assert_eq!(kept(col("name").lt(lit("dog")), true), 0..8);
    }
}
