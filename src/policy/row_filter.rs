//! Row filters compared fast: a string column compared for equality with a
//! constant (`region = user_attr('region')` once bound, the commonest row
//! filter) is evaluated view by view, without the per-row branches of the
//! general comparison kernel. The comparison stays what it was everywhere
//! else: it shows as itself in EXPLAIN, prunes row groups and pages as
//! itself (its snapshot is the plain comparison), and is equal only to the
//! same fast comparison.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch, StringViewArray};
use arrow::buffer::BooleanBuffer;
use arrow::datatypes::{DataType, Schema};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::{ColumnarValue, Operator};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};

/// `expr` with each string equality in it compared fast.
pub(crate) fn fast_string_equality(expr: Arc<dyn PhysicalExpr>) -> Result<Arc<dyn PhysicalExpr>> {
    Ok(expr
        .transform_up(|node| {
            if node.downcast_ref::<StringEquals>().is_some() {
                return Ok(Transformed::no(node));
            }
            Ok(match StringEquals::new(Arc::clone(&node)) {
                Some(fast) => Transformed::yes(Arc::new(fast) as Arc<dyn PhysicalExpr>),
                None => Transformed::no(node),
            })
        })?
        .data)
}

/// `column = 'constant'` or `column <> 'constant'`, compared view by view
/// when the column holds string views (else as the plain comparison).
#[derive(Debug, Clone, Eq)]
pub(crate) struct StringEquals {
    /// The plain comparison, this expression's only child.
    plain: Arc<dyn PhysicalExpr>,
    // Read from `plain` once, not at each batch.
    column: usize,
    value: Arc<str>,
    negated: bool,
}

impl StringEquals {
    fn new(plain: Arc<dyn PhysicalExpr>) -> Option<Self> {
        let (column, value, negated) = string_equals(&plain)?;
        Some(Self {
            plain,
            column,
            value,
            negated,
        })
    }
}

// The rest is read from the plain comparison: equal comparisons are equal.
impl PartialEq for StringEquals {
    fn eq(&self, other: &Self) -> bool {
        self.plain.eq(&other.plain)
    }
}

impl Hash for StringEquals {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.plain.hash(state);
    }
}

impl fmt::Display for StringEquals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.plain.fmt(f)
    }
}

impl PhysicalExpr for StringEquals {
    fn data_type(&self, input_schema: &Schema) -> Result<DataType> {
        self.plain.data_type(input_schema)
    }

    fn nullable(&self, input_schema: &Schema) -> Result<bool> {
        self.plain.nullable(input_schema)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        match batch
            .columns()
            .get(self.column)
            .and_then(|column| column.as_string_view_opt())
        {
            Some(strings) => Ok(ColumnarValue::Array(Arc::new(view_equals(
                strings,
                &self.value,
                self.negated,
            )))),
            None => self.plain.evaluate(batch),
        }
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        vec![&self.plain]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "a string equality has exactly one child".into(),
            ));
        }
        let plain = children.swap_remove(0);
        // A child that is no longer a string equality stands for itself.
        Ok(match Self::new(Arc::clone(&plain)) {
            Some(fast) => Arc::new(fast),
            None => plain,
        })
    }

    /// Bounds and constraints pass through unchanged: to interval analysis
    /// (and the selectivity it estimates) this node is its child.
    fn evaluate_bounds(&self, children: &[&Interval]) -> Result<Interval> {
        match children {
            [child] => Ok((*child).clone()),
            _ => Interval::make_unbounded(&DataType::Boolean),
        }
    }

    fn propagate_constraints(
        &self,
        interval: &Interval,
        _children: &[&Interval],
    ) -> Result<Option<Vec<Interval>>> {
        Ok(Some(vec![interval.clone()]))
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.plain.fmt_sql(f)
    }

    /// Pruning reads the plain comparison, which it knows how to apply to
    /// row-group and page statistics.
    fn snapshot(&self) -> Result<Option<Arc<dyn PhysicalExpr>>> {
        Ok(Some(Arc::clone(&self.plain)))
    }
}

/// The column, constant and negation of `column = 'constant'` (either way
/// round) or `column <> 'constant'`.
fn string_equals(expr: &Arc<dyn PhysicalExpr>) -> Option<(usize, Arc<str>, bool)> {
    let binary = expr.downcast_ref::<BinaryExpr>()?;
    let negated = match binary.op() {
        Operator::Eq => false,
        Operator::NotEq => true,
        _ => return None,
    };
    let (column, literal) = match (
        binary.left().downcast_ref::<Column>(),
        binary.right().downcast_ref::<Literal>(),
    ) {
        (Some(column), Some(literal)) => (column, literal),
        _ => (
            binary.right().downcast_ref::<Column>()?,
            binary.left().downcast_ref::<Literal>()?,
        ),
    };
    let value = match literal.value() {
        ScalarValue::Utf8(Some(value))
        | ScalarValue::Utf8View(Some(value))
        | ScalarValue::LargeUtf8(Some(value)) => value,
        _ => return None,
    };
    // A view's length is 32 bits: a longer constant is left to the plain
    // comparison.
    u32::try_from(value.len()).ok()?;
    Some((column.index(), value.as_str().into(), negated))
}

/// Whether each string equals `value` (differs from it, when `negated`);
/// NULL where the string is NULL. A string view holds its length and first
/// four bytes (all of a string of up to 12 bytes) in its low bits, so most
/// rows are told apart by one masked comparison of the view; the bytes are
/// read only when a longer string's length and prefix match.
fn view_equals(strings: &StringViewArray, value: &str, negated: bool) -> BooleanArray {
    let value_bytes = value.as_bytes();
    let length = value_bytes.len();
    let mut head = [0_u8; 16];
    head[..4].copy_from_slice(&(length as u32).to_le_bytes());
    let inline = length <= 12;
    // The view's length and the bytes it holds of the string: all of them
    // when it is inlined, else its 4-byte prefix. The rest of an inlined
    // view is padding, not compared.
    let compared = if inline { length } else { 4 };
    head[4..4 + compared].copy_from_slice(&value_bytes[..compared]);
    let expected = u128::from_le_bytes(head);
    let mask = if 4 + compared == 16 {
        u128::MAX
    } else {
        (1_u128 << (8 * (4 + compared))) - 1
    };
    let views = strings.views();
    let equal = if inline {
        BooleanBuffer::collect_bool(views.len(), |i| views[i] & mask == expected)
    } else {
        BooleanBuffer::collect_bool(views.len(), |i| {
            // SAFETY: `i` is below the array's length.
            views[i] & mask == expected && unsafe { strings.value_unchecked(i) } == value
        })
    };
    let values = if negated { !&equal } else { equal };
    BooleanArray::new(values, strings.nulls().cloned())
}

#[cfg(test)]
mod tests {
    use arrow::array::{ArrayRef, StringArray};
    use arrow::buffer::ScalarBuffer;
    use arrow::compute::prep_null_mask_filter;
    use arrow::datatypes::Field;
    use datafusion::physical_expr::expressions::{binary, col, lit};
    use datafusion::physical_expr::utils::split_conjunction;
    use datafusion::physical_expr_common::physical_expr::snapshot_physical_expr;

    use super::*;

    fn strings() -> Vec<Option<&'static str>> {
        vec![
            Some("EU"),
            Some("US"),
            None,
            Some(""),
            Some("EU "),
            Some("exactly12byt"),
            Some("exactly12bytes"),
            Some("a string well over twelve bytes"),
            Some("a string well over twelve bytes!"),
            Some("a string"),
        ]
    }

    fn batch(column: ArrayRef) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "s",
            column.data_type().clone(),
            true,
        )]));
        RecordBatch::try_new(schema, vec![column]).expect("batch")
    }

    /// The rows `predicate` keeps (NULL counts as false).
    fn kept(predicate: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> Vec<bool> {
        let holds = predicate
            .evaluate(batch)
            .and_then(|value| value.into_array(batch.num_rows()))
            .expect("evaluates");
        let holds = prep_null_mask_filter(holds.as_boolean());
        holds.values().iter().collect()
    }

    #[test]
    fn string_equality_keeps_the_rows_the_plain_comparison_keeps() {
        let views = batch(Arc::new(StringViewArray::from(strings())));
        let plain = batch(Arc::new(StringArray::from(strings())));
        let constants = [
            "EU",
            "",
            "exactly12byt",
            "exactly12bytes",
            "a string well over twelve bytes",
            "a st",
            "absent",
        ];
        for constant in constants {
            for op in [Operator::Eq, Operator::NotEq] {
                for data in [&views, &plain] {
                    let schema = data.schema();
                    let column = col("s", &schema).expect("column");
                    let value = match data.column(0).data_type() {
                        DataType::Utf8View => lit(ScalarValue::Utf8View(Some(constant.into()))),
                        _ => lit(constant),
                    };
                    let predicate = binary(column, op, value, &schema).expect("predicate");
                    let fast = fast_string_equality(Arc::clone(&predicate)).expect("rewrites");
                    assert!(fast.downcast_ref::<StringEquals>().is_some(), "{predicate}");
                    assert_eq!(fast.to_string(), predicate.to_string());
                    assert_eq!(kept(&fast, data), kept(&predicate, data), "{predicate}");
                }
            }
        }
    }

    #[test]
    fn an_inlined_views_padding_is_not_compared() {
        // "EU" inlined with non-zero bytes after it, as another writer may
        // leave them.
        let mut view = [0_u8; 16];
        view[..4].copy_from_slice(&2_u32.to_le_bytes());
        view[4..6].copy_from_slice(b"EU");
        view[10] = 0xff;
        let views = ScalarBuffer::from(vec![u128::from_le_bytes(view)]);
        // SAFETY: an inlined view of valid UTF-8, with no data buffers.
        let strings = unsafe { StringViewArray::new_unchecked(views, vec![], None) };
        assert_eq!(strings.value(0), "EU");
        assert!(view_equals(&strings, "EU", false).value(0));
        assert!(!view_equals(&strings, "EU", true).value(0));
    }

    #[test]
    fn only_the_equalities_of_a_filter_change_and_pruning_sees_them_plain() {
        let data = batch(Arc::new(StringViewArray::from(strings())));
        let schema = data.schema();
        let s = col("s", &schema).expect("column");
        let compare = |op, value: &str| {
            binary(
                Arc::clone(&s),
                op,
                lit(ScalarValue::Utf8View(Some(value.into()))),
                &schema,
            )
            .expect("comparison")
        };
        let and = |l, r| binary(l, Operator::And, r, &schema).expect("and");
        let filter = and(
            and(compare(Operator::NotEq, "EU"), compare(Operator::Lt, "b")),
            compare(Operator::NotEq, "US"),
        );
        let fast = fast_string_equality(Arc::clone(&filter)).expect("rewrites");
        let kinds: Vec<bool> = split_conjunction(&fast)
            .iter()
            .map(|conjunct| conjunct.downcast_ref::<StringEquals>().is_some())
            .collect();
        assert_eq!(kinds, [true, false, true]);
        assert_eq!(kept(&fast, &data), kept(&filter, &data));
        assert_eq!(kept(&fast, &data).iter().filter(|k| **k).count(), 5);
        // Rewritten twice, the same; equal to itself, not to the plain filter.
        let again = fast_string_equality(Arc::clone(&fast)).expect("rewrites");
        assert_eq!(&again, &fast);
        assert_ne!(&fast, &filter);
        // What pruning reads: the plain filter.
        let snapshot = snapshot_physical_expr(Arc::clone(&fast)).expect("snapshot");
        assert_eq!(&snapshot, &filter);
    }
}
