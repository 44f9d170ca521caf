//! A join's key list looked up in a bitmap of the keys' range.
//!
//! A key list evaluated while a scan decodes (see `join_filters`) is an
//! `IN` list, which DataFusion answers from a hash set: TPC-H q17 checks
//! each of 6M `l_partkey` values, twice, against 200 part keys, and the
//! hash lookups took 15% of the query's time. Integer keys spread over a
//! modest range are answered instead by one bit per integer of the range:
//! a subtraction, a comparison and a bit test per row, from a bitmap that
//! stays in the cache (200 keys out of 200 000: 25 KB).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, ArrowPrimitiveType, AsArray, BooleanArray, BooleanBufferBuilder};
use arrow::buffer::BooleanBuffer;
use arrow::datatypes::{DataType, Int32Type, Int64Type, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::common::{ScalarValue, internal_err};
use datafusion::error::Result;
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{Column, InListExpr, Literal};

/// The most integers a bitmap spans: 8 MiB of bits.
const MAX_RANGE: u64 = 1 << 26;

/// `list` answered from a bitmap, when it looks an `INT` or `BIGINT` column
/// up among integer constants (no null) spanning at most [`MAX_RANGE`]
/// integers.
pub(super) fn key_bitmap(list: &Arc<dyn PhysicalExpr>) -> Option<Arc<dyn PhysicalExpr>> {
    let in_list = list.downcast_ref::<InListExpr>()?;
    let looks_up_a_column = in_list.expr().downcast_ref::<Column>().is_some();
    if in_list.negated() || !looks_up_a_column {
        return None;
    }
    // The keys' type is the first key's; every key must have it.
    let first = in_list.list().first()?.downcast_ref::<Literal>()?;
    let key_type = first.value().data_type();
    let keys = in_list
        .list()
        .iter()
        .map(
            |item| match (item.downcast_ref::<Literal>()?.value(), &key_type) {
                (ScalarValue::Int64(Some(key)), DataType::Int64) => Some(*key),
                (ScalarValue::Int32(Some(key)), DataType::Int32) => Some(i64::from(*key)),
                _ => None,
            },
        )
        .collect::<Option<Vec<i64>>>()?;
    let min = *keys.iter().min()?;
    let max = *keys.iter().max()?;
    let range = u64::try_from(i128::from(max) - i128::from(min) + 1).ok()?;
    if range > MAX_RANGE {
        return None;
    }
    let range = usize::try_from(range).ok()?;
    let mut bits = BooleanBufferBuilder::new(range);
    bits.append_n(range, false);
    for key in keys {
        // `min <= key <= max`: within the range.
        bits.set_bit((i128::from(key) - i128::from(min)) as usize, true);
    }
    Some(Arc::new(KeyBitmap {
        value: Arc::clone(in_list.expr()),
        value_type: key_type,
        min,
        bits: bits.finish(),
        list: Arc::clone(list),
    }))
}

/// `value IN (keys)`, answered from a bitmap of the integers from `min`
/// on. Displays as the list it replaces.
#[derive(Debug, Clone)]
struct KeyBitmap {
    value: Arc<dyn PhysicalExpr>,
    /// The type of `value` and of the keys.
    value_type: DataType,
    min: i64,
    /// Bit `i` is set when `min + i` is a key.
    bits: BooleanBuffer,
    /// The list it replaces.
    list: Arc<dyn PhysicalExpr>,
}

impl KeyBitmap {
    /// Whether each of `values` is a key.
    fn lookup<T: ArrowPrimitiveType>(&self, values: &[T::Native]) -> BooleanBuffer
    where
        T::Native: Into<i64>,
    {
        let (min, range) = (i128::from(self.min), self.bits.len() as i128);
        BooleanBuffer::collect_bool(values.len(), |i| {
            let offset = i128::from(values[i].into()) - min;
            // `offset` is below `range`, which is at most `MAX_RANGE`.
            (0..range).contains(&offset) && self.bits.value(offset as usize)
        })
    }
}

impl PartialEq for KeyBitmap {
    fn eq(&self, other: &Self) -> bool {
        self.value.eq(&other.value) && self.list.eq(&other.list)
    }
}

impl Eq for KeyBitmap {}

impl Hash for KeyBitmap {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.value.hash(state);
        self.list.hash(state);
    }
}

impl fmt::Display for KeyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.list.fmt(f)
    }
}

impl PhysicalExpr for KeyBitmap {
    fn data_type(&self, _input_schema: &Schema) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn nullable(&self, input_schema: &Schema) -> Result<bool> {
        self.value.nullable(input_schema)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        let values = self.value.evaluate(batch)?.into_array(batch.num_rows())?;
        if *values.data_type() != self.value_type {
            return internal_err!(
                "a key bitmap over {} was given {}",
                self.value_type,
                values.data_type()
            );
        }
        let found = match self.value_type {
            DataType::Int64 => {
                self.lookup::<Int64Type>(values.as_primitive::<Int64Type>().values())
            }
            _ => self.lookup::<Int32Type>(values.as_primitive::<Int32Type>().values()),
        };
        // A null value is in no list of keys without nulls: the answer is
        // null, as `IN` answers.
        Ok(ColumnarValue::Array(Arc::new(BooleanArray::new(
            found,
            values.nulls().cloned(),
        ))))
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        vec![&self.value]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        let Ok([value]) = <[_; 1]>::try_from(children) else {
            return internal_err!("a key bitmap takes one child, its value");
        };
        Ok(Arc::new(KeyBitmap {
            value,
            ..(*self).clone()
        }))
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.list.fmt_sql(f)
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{ArrayRef, Int32Array, Int64Array};
    use arrow::datatypes::Field;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn in_list(data_type: DataType, keys: &[i64], schema: &Schema) -> Arc<dyn PhysicalExpr> {
        let literal = |key: i64| -> Arc<dyn PhysicalExpr> {
            Arc::new(Literal::new(match data_type {
                DataType::Int32 => ScalarValue::Int32(Some(key as i32)),
                _ => ScalarValue::Int64(Some(key)),
            }))
        };
        Arc::new(
            InListExpr::try_new(
                Arc::new(Column::new("k", 0)),
                keys.iter().map(|&key| literal(key)).collect(),
                false,
                schema,
            )
            .expect("a list"),
        )
    }

    /// The same answers as the `IN` list, nulls included, for `INT` and
    /// `BIGINT` keys, values in, below, above and far outside the keys'
    /// range (down to the type's smallest and up to its largest).
    #[test]
    fn answers_as_the_list() {
        let mut rng = StdRng::seed_from_u64(5);
        for (round, data_type) in [DataType::Int64, DataType::Int32]
            .iter()
            .cycle()
            .take(60)
            .enumerate()
        {
            let schema = Schema::new(vec![Field::new("k", data_type.clone(), true)]);
            let base = rng.random_range(-1000..1000_i64);
            let keys: Vec<i64> = (0..rng.random_range(1..50))
                .map(|_| base + rng.random_range(0..500))
                .collect();
            let extremes = match data_type {
                DataType::Int32 => [i64::from(i32::MIN), i64::from(i32::MAX)],
                _ => [i64::MIN, i64::MAX],
            };
            let values: Vec<Option<i64>> = (0..300)
                .map(|i| match i % 10 {
                    0 => None,
                    1 => Some(extremes[i % 2]),
                    2 => Some(keys[i % keys.len()]),
                    _ => Some(base + rng.random_range(-50..600)),
                })
                .collect();
            let column: ArrayRef = match data_type {
                DataType::Int32 => Arc::new(
                    values
                        .iter()
                        .map(|v| v.map(|v| v as i32))
                        .collect::<Int32Array>(),
                ),
                _ => Arc::new(values.iter().copied().collect::<Int64Array>()),
            };
            let batch =
                RecordBatch::try_new(Arc::new(schema.clone()), vec![column]).expect("batch");
            let list = in_list(data_type.clone(), &keys, &schema);
            let bitmap = key_bitmap(&list).expect("a bitmap");
            let answers = |expr: &Arc<dyn PhysicalExpr>| {
                expr.evaluate(&batch)
                    .and_then(|value| value.into_array(batch.num_rows()))
                    .expect("answers")
            };
            assert_eq!(&answers(&list), &answers(&bitmap), "round {round}");
            assert_eq!(bitmap.to_string(), list.to_string());
        }
    }

    /// Lists it does not answer are left as they are: negated, with a null,
    /// of another type, or spanning more integers than a bitmap holds.
    #[test]
    fn other_lists_are_left_alone() {
        let schema = Schema::new(vec![Field::new("k", DataType::Int64, true)]);
        let column: Arc<dyn PhysicalExpr> = Arc::new(Column::new("k", 0));
        let list = |items: Vec<ScalarValue>, negated: bool| -> Arc<dyn PhysicalExpr> {
            Arc::new(
                InListExpr::try_new(
                    Arc::clone(&column),
                    items
                        .into_iter()
                        .map(|v| Arc::new(Literal::new(v)) as Arc<dyn PhysicalExpr>)
                        .collect(),
                    negated,
                    &schema,
                )
                .expect("a list"),
            )
        };
        let int = |v: i64| ScalarValue::Int64(Some(v));
        assert!(key_bitmap(&list(vec![int(1), int(2)], false)).is_some());
        assert!(key_bitmap(&list(vec![int(1), int(2)], true)).is_none());
        assert!(key_bitmap(&list(vec![int(1), ScalarValue::Int64(None)], false)).is_none());
        assert!(key_bitmap(&list(vec![int(0), int(1 << 26)], false)).is_none());
        assert!(key_bitmap(&list(vec![int(i64::MIN), int(i64::MAX)], false)).is_none());
        let floats = Schema::new(vec![Field::new("k", DataType::Float64, true)]);
        let float_list: Arc<dyn PhysicalExpr> = Arc::new(
            InListExpr::try_new(
                Arc::clone(&column),
                vec![Arc::new(Literal::new(ScalarValue::Float64(Some(1.0))))],
                false,
                &floats,
            )
            .expect("a list"),
        );
        assert!(key_bitmap(&float_list).is_none());
    }
}
