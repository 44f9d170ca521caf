//! Row filters compared fast: a string column compared for equality with a
//! constant (`region = user_attr('region')` once bound, the commonest row
//! filter) is evaluated view by view, without the per-row branches of the
//! general comparison kernel, or, read as a dictionary, once per distinct
//! string. The comparison stays what it was everywhere
//! else: it shows as itself in EXPLAIN, prunes row groups and pages as
//! itself (its snapshot is the plain comparison), and is equal only to the
//! same fast comparison.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch, StringArray, StringViewArray};
use arrow::buffer::BooleanBuffer;
use arrow::datatypes::{DataType, Schema};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::{ColumnarValue, Expr, Operator};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, CastExpr, Column, Literal};

use super::leakproof::is_comparison;

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

/// Whether `filter` reads column `name` only to compare it with string
/// constants (`=`, `<>`, `<`, `<=`, `>`, `>=`, `IS [NOT] DISTINCT FROM`,
/// `IN (...)`, `IS [NOT] NULL`). Such a column may be read as a dictionary
/// of strings: the comparisons keep their meaning, and once their constants
/// are plain strings (see [`with_plain_constants`]) they plan without a cast.
pub(crate) fn compares_with_constants_only(filter: &Expr, name: &str) -> bool {
    let is_column = |e: &Expr| matches!(e, Expr::Column(column) if column.name == name);
    match filter {
        Expr::Column(column) => column.name != name,
        Expr::BinaryExpr(binary)
            if is_comparison(binary.op)
                && ((is_column(&binary.left) && string_constant(&binary.right).is_some())
                    || (string_constant(&binary.left).is_some() && is_column(&binary.right))) =>
        {
            true
        }
        Expr::InList(list)
            if is_column(&list.expr) && list.list.iter().all(|e| string_constant(e).is_some()) =>
        {
            true
        }
        Expr::IsNull(operand) | Expr::IsNotNull(operand) if is_column(operand) => true,
        other => {
            let mut only = true;
            // Visiting children cannot fail.
            let _ = other.apply_children(|child| {
                only = compares_with_constants_only(child, name);
                Ok(if only {
                    TreeNodeRecursion::Continue
                } else {
                    TreeNodeRecursion::Stop
                })
            });
            only
        }
    }
}

/// `filter` with the constants each of `columns` is compared with made
/// plain `Utf8` (policies are compiled against the product's types, so a
/// constant compared with a view column is a view): compared with a
/// `Dictionary(_, Utf8)` column, a plain constant keeps the dictionary,
/// where any other would cast every row.
pub(crate) fn with_plain_constants(filter: Expr, columns: &[&str]) -> Result<Expr> {
    let is_column =
        |e: &Expr| matches!(e, Expr::Column(column) if columns.contains(&column.name.as_str()));
    let plain = |e: Box<Expr>| -> Box<Expr> {
        match string_constant(&e) {
            Some((value, metadata)) => Box::new(Expr::Literal(
                ScalarValue::Utf8(value.clone()),
                metadata.clone(),
            )),
            None => e,
        }
    };
    filter
        .transform_up(|e| {
            Ok(match e {
                Expr::BinaryExpr(mut binary)
                    if is_comparison(binary.op)
                        && (is_column(&binary.left) || is_column(&binary.right)) =>
                {
                    binary.left = plain(binary.left);
                    binary.right = plain(binary.right);
                    Transformed::yes(Expr::BinaryExpr(binary))
                }
                Expr::InList(mut list) if is_column(&list.expr) => {
                    list.list = list.list.into_iter().map(|e| *plain(Box::new(e))).collect();
                    Transformed::yes(Expr::InList(list))
                }
                other => Transformed::no(other),
            })
        })
        .map(|t| t.data)
}

/// The value and metadata of a string constant of any string type.
fn string_constant(
    expr: &Expr,
) -> Option<(
    &Option<String>,
    &Option<datafusion::common::metadata::FieldMetadata>,
)> {
    match expr {
        Expr::Literal(
            ScalarValue::Utf8(value) | ScalarValue::Utf8View(value) | ScalarValue::LargeUtf8(value),
            metadata,
        ) => Some((value, metadata)),
        _ => None,
    }
}

/// `column = 'constant'` or `column <> 'constant'`, compared view by view
/// when the column holds string views, value by value when it holds a
/// dictionary of strings (else as the plain comparison).
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
        let Some(column) = batch.columns().get(self.column) else {
            return self.plain.evaluate(batch);
        };
        if let Some(strings) = column.as_string_view_opt() {
            return Ok(ColumnarValue::Array(Arc::new(view_equals(
                strings,
                &self.value,
                self.negated,
            ))));
        }
        if let Some(dictionary) = column.as_any_dictionary_opt()
            && let Some(values) = dictionary.values().as_string_opt::<i32>()
        {
            return Ok(ColumnarValue::Array(Arc::new(dictionary_equals(
                dictionary.keys(),
                values,
                &self.value,
                self.negated,
            )?)));
        }
        self.plain.evaluate(batch)
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
        constant(binary.right()),
    ) {
        (Some(column), Some(literal)) => (column, literal),
        _ => (
            binary.right().downcast_ref::<Column>()?,
            constant(binary.left())?,
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

/// The literal of a constant: itself, or a string literal cast to a
/// dictionary of strings (the constant a dictionary column is compared with).
fn constant(expr: &Arc<dyn PhysicalExpr>) -> Option<&Literal> {
    if let Some(literal) = expr.downcast_ref::<Literal>() {
        return Some(literal);
    }
    let cast = expr.downcast_ref::<CastExpr>()?;
    match cast.cast_type() {
        DataType::Dictionary(_, values) if **values == DataType::Utf8 => {
            cast.expr().downcast_ref::<Literal>()
        }
        _ => None,
    }
}

/// Whether each string of a dictionary equals `value` (differs from it,
/// when `negated`); NULL where the string is NULL. Each distinct string is
/// compared once; when every one passes and none is NULL, so does every row
/// without its key being read.
fn dictionary_equals(
    keys: &dyn Array,
    values: &StringArray,
    value: &str,
    negated: bool,
) -> Result<BooleanArray> {
    let equal =
        BooleanBuffer::collect_bool(values.len(), |i| (values.value(i) == value) != negated);
    let per_value = BooleanArray::new(equal, values.nulls().cloned());
    let passes = per_value.true_count();
    if keys.null_count() == 0 && passes == per_value.len() {
        return Ok(BooleanArray::new(BooleanBuffer::new_set(keys.len()), None));
    }
    if keys.null_count() == 0 && per_value.null_count() == 0 && passes == 0 {
        return Ok(BooleanArray::new(
            BooleanBuffer::new_unset(keys.len()),
            None,
        ));
    }
    let per_row = arrow::compute::take(&per_value, keys, None)?;
    Ok(per_row.as_boolean().clone())
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
    use arrow::array::DictionaryArray;
    use arrow::array::{ArrayRef, StringArray};
    use arrow::buffer::ScalarBuffer;
    use arrow::compute::prep_null_mask_filter;
    use arrow::datatypes::Field;
    use arrow::datatypes::Int32Type;
    use datafusion::physical_expr::expressions::{binary, cast, col, lit};
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
        let holds = holds.as_boolean();
        match holds.nulls() {
            Some(_) => prep_null_mask_filter(holds).values().iter().collect(),
            None => holds.values().iter().collect(),
        }
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
        let dictionary_type =
            DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        let dictionary = batch(Arc::new(
            strings()
                .into_iter()
                .collect::<DictionaryArray<Int32Type>>(),
        ));
        // Every string passes `<> 'absent'`: the shortcut, with and without
        // a NULL key.
        let no_null = batch(Arc::new(
            strings()
                .into_iter()
                .flatten()
                .collect::<DictionaryArray<Int32Type>>(),
        ));
        for constant in constants {
            for op in [Operator::Eq, Operator::NotEq] {
                for data in [&views, &plain, &dictionary, &no_null] {
                    let schema = data.schema();
                    let column = col("s", &schema).expect("column");
                    let value = match data.column(0).data_type() {
                        DataType::Utf8View => lit(ScalarValue::Utf8View(Some(constant.into()))),
                        DataType::Dictionary(..) => {
                            cast(lit(constant), &schema, dictionary_type.clone()).expect("cast")
                        }
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

    #[test]
    fn only_comparisons_with_string_constants_let_a_column_be_a_dictionary() {
        use datafusion::functions::string::expr_fn::upper;
        use datafusion::prelude::{col, lit};

        let region = || col("region");
        let accepted = [
            region().eq(lit("EU")),
            lit("EU").not_eq(region()),
            region().lt(lit("M")).or(region().gt_eq(lit("T"))),
            region().in_list(vec![lit("EU"), lit("US")], true),
            region()
                .is_null()
                .or(Expr::BinaryExpr(datafusion::logical_expr::BinaryExpr::new(
                    Box::new(region()),
                    Operator::IsNotDistinctFrom,
                    Box::new(lit("EU")),
                ))),
            // Constants of any string type (made plain for the dictionary).
            region().eq(lit(ScalarValue::Utf8View(Some("EU".into())))),
            region().in_list(vec![lit(ScalarValue::LargeUtf8(Some("EU".into())))], false),
            // Other columns may be read any way.
            region()
                .eq(lit("EU"))
                .and(upper(col("name")).eq(col("name"))),
            col("salary").lt(lit(450_i64)),
        ];
        for filter in accepted {
            assert!(compares_with_constants_only(&filter, "region"), "{filter}");
        }
        let refused = [
            // Compared with a column, a non-string or a computed value.
            region().eq(col("home")),
            region().eq(lit(1_i64)),
            region().eq(upper(lit("eu"))),
            // Read by a function, a cast, a pattern, or as a value.
            upper(region()).eq(lit("EU")),
            region().like(lit("E%")),
            Expr::Cast(datafusion::logical_expr::Cast::new(
                Box::new(region()),
                DataType::Utf8View,
            ))
            .eq(lit("EU")),
            region().in_list(vec![lit("EU"), col("home")], false),
            region().eq(lit("EU")).and(region().is_true()),
        ];
        for filter in refused {
            assert!(!compares_with_constants_only(&filter, "region"), "{filter}");
        }
    }

    #[test]
    fn constants_compared_with_a_dictionary_column_are_made_plain() {
        use datafusion::prelude::{col, lit};

        let view = |v: &str| lit(ScalarValue::Utf8View(Some(v.into())));
        let plain = |v: &str| lit(ScalarValue::Utf8(Some(v.into())));
        let filter = col("region")
            .eq(view("EU"))
            .or(view("US").lt_eq(col("region")))
            .or(col("region").in_list(vec![view("APAC"), lit(ScalarValue::Utf8View(None))], true))
            .and(col("name").eq(view("Ann")));
        let expected = col("region")
            .eq(plain("EU"))
            .or(plain("US").lt_eq(col("region")))
            .or(col("region").in_list(vec![plain("APAC"), lit(ScalarValue::Utf8(None))], true))
            .and(col("name").eq(view("Ann")));
        assert_eq!(
            with_plain_constants(filter, &["region"]).expect("rewrites"),
            expected
        );
    }
}
