//! The row filter as the barrier evaluates it: one conjunct at a time, and a
//! string column compared for equality with a constant (`region =
//! user_attr('region')` once bound, the commonest row filter) compared view
//! by view, without the per-row branches of the general comparison kernel.

use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch, StringViewArray};
use arrow::buffer::BooleanBuffer;
use arrow::compute::prep_null_mask_filter;
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
use datafusion::physical_expr::utils::split_conjunction;

/// A row filter as the barrier evaluates it.
#[derive(Debug, Clone)]
pub(crate) enum RowFilter {
    /// Conjuncts each comparing a string column with a constant.
    StringEquals(Vec<StringEquals>),
    /// Any other filter, evaluated as it is (so that a conjunct that could
    /// fail, such as a division, sees only the rows DataFusion gives it).
    General(Arc<dyn PhysicalExpr>),
}

/// `column = value`, or `column <> value` when `negated`.
#[derive(Debug, Clone)]
pub(crate) struct StringEquals {
    column: usize,
    value: Arc<str>,
    negated: bool,
    /// The same as a general expression, for a column that is not held as
    /// string views.
    expr: Arc<dyn PhysicalExpr>,
}

impl RowFilter {
    pub(crate) fn new(predicate: &Arc<dyn PhysicalExpr>) -> Self {
        split_conjunction(predicate)
            .into_iter()
            .map(|conjunct| {
                string_equals(conjunct).map(|(column, value, negated)| StringEquals {
                    column,
                    value,
                    negated,
                    expr: Arc::clone(conjunct),
                })
            })
            .collect::<Option<Vec<_>>>()
            .map_or_else(|| Self::General(Arc::clone(predicate)), Self::StringEquals)
    }

    /// Which rows of `batch` the filter keeps (a NULL hides the row, as
    /// false does).
    pub(crate) fn evaluate(&self, batch: &RecordBatch) -> Result<BooleanArray> {
        let conjuncts = match self {
            Self::General(expr) => return kept(&evaluate(expr, batch)?),
            Self::StringEquals(conjuncts) => conjuncts,
        };
        let mut all = BooleanBuffer::new_set(batch.num_rows());
        for conjunct in conjuncts {
            let holds = match batch.column(conjunct.column).as_string_view_opt() {
                Some(strings) => view_equals(strings, &conjunct.value, conjunct.negated),
                None => evaluate(&conjunct.expr, batch)?,
            };
            all = &all & kept(&holds)?.values();
        }
        Ok(BooleanArray::new(all, None))
    }
}

fn evaluate(expr: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> Result<BooleanArray> {
    expr.evaluate(batch)?
        .into_array(batch.num_rows())?
        .as_boolean_opt()
        .cloned()
        .ok_or_else(|| DataFusionError::Internal("row filter is not boolean".into()))
}

/// `holds` with NULL made false.
fn kept(holds: &BooleanArray) -> Result<BooleanArray> {
    Ok(if holds.null_count() > 0 {
        prep_null_mask_filter(holds)
    } else {
        holds.clone()
    })
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
    match literal.value() {
        ScalarValue::Utf8(Some(value))
        | ScalarValue::Utf8View(Some(value))
        | ScalarValue::LargeUtf8(Some(value)) => {
            Some((column.index(), value.as_str().into(), negated))
        }
        _ => None,
    }
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
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::{binary, col, lit};

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

    /// The rows the general kernel keeps, as the filter below the barrier
    /// would: NULL counts as false.
    fn general(predicate: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> Vec<bool> {
        let holds = predicate
            .evaluate(batch)
            .and_then(|value| value.into_array(batch.num_rows()))
            .expect("evaluates");
        let holds = prep_null_mask_filter(holds.as_boolean());
        holds.values().iter().collect()
    }

    #[test]
    fn string_equality_keeps_the_rows_the_general_kernel_keeps() {
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
                    let value = lit(ScalarValue::Utf8View(Some(constant.into())));
                    let predicate = match data.column(0).data_type() {
                        DataType::Utf8View => binary(column, op, value, &schema),
                        _ => binary(column, op, lit(constant), &schema),
                    }
                    .expect("predicate");
                    let filter = RowFilter::new(&predicate);
                    assert!(
                        matches!(&filter, RowFilter::StringEquals(c) if c.len() == 1),
                        "{predicate}"
                    );
                    let kept: Vec<bool> = filter
                        .evaluate(data)
                        .expect("evaluates")
                        .values()
                        .iter()
                        .collect();
                    assert_eq!(kept, general(&predicate, data), "{predicate}");
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
    fn every_equality_must_hold_and_any_other_conjunct_keeps_the_whole_filter_general() {
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
        let neither = and(
            compare(Operator::NotEq, "EU"),
            compare(Operator::NotEq, "US"),
        );
        let filter = RowFilter::new(&neither);
        assert!(matches!(&filter, RowFilter::StringEquals(c) if c.len() == 2));
        let kept: Vec<bool> = filter
            .evaluate(&data)
            .expect("evaluates")
            .values()
            .iter()
            .collect();
        assert_eq!(kept, general(&neither, &data));
        assert_eq!(kept.iter().filter(|k| **k).count(), 7, "{kept:?}");

        let mixed = and(compare(Operator::NotEq, "EU"), compare(Operator::Lt, "b"));
        let filter = RowFilter::new(&mixed);
        assert!(matches!(filter, RowFilter::General(_)));
        let kept: Vec<bool> = filter
            .evaluate(&data)
            .expect("evaluates")
            .values()
            .iter()
            .collect();
        assert_eq!(kept, general(&mixed, &data));
        assert_eq!(kept.iter().filter(|k| **k).count(), 6, "{kept:?}");
    }
}
