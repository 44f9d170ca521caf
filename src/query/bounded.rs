//! Functions whose result grows with the value of an argument, stopped
//! before they run rather than after.
//!
//! `repeat('x', 2147483647)` makes a 2 GiB string from a query of 30 bytes,
//! `generate_series(1, 10000000000)` a list of 80 GB; memory pools do not
//! see what a scalar function allocates, and an allocation the system
//! cannot satisfy ends the process, every client's queries with it. Each
//! such function is registered wrapped in a [`Bounded`] function: before
//! the function runs on a batch, the size of its result is worked out from
//! its arguments (an upper bound: how many bytes, or list elements of 8
//! bytes, it can produce at most), and a batch whose result would pass
//! [`MAX_RESULT_BYTES`] fails the query with a resources-exhausted error.
//! Everything else is the wrapped function's own.

use std::any::Any;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array};
use arrow::compute::cast;
use arrow::compute::kernels::length::length;
use arrow::datatypes::{DataType, FieldRef, IntervalUnit, TimeUnit};
use datafusion::common::{DataFusionError, Result};
use datafusion::config::ConfigOptions;
use datafusion::execution::{FunctionRegistry, SessionState};
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature,
};

/// The most one call of a bounded function may produce for one batch (or,
/// for `levenshtein`, the most pairs of characters it may compare).
const MAX_RESULT_BYTES: u64 = 256 << 20;

/// A list element, counted as the 8 bytes of an integer or a timestamp.
const ELEMENT_BYTES: u64 = 8;

const NANOS_PER_DAY: i128 = 86_400 * 1_000_000_000;

/// How a function's result grows with its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(text, n)`: the text n times.
    Repeat,
    /// `lpad` / `rpad(text, n [, fill])`: n characters.
    Pad,
    /// `replace(text, from, to)`: `to` for every `from` in the text (and
    /// between every character when `from` is empty).
    Replace,
    /// `regexp_replace(text, pattern, replacement [, flags])`: the
    /// replacement for every match (a pattern may match the empty string
    /// at every position), each group it names at most the whole text.
    RegexpReplace,
    /// `array_repeat(element, n)`: n elements, each as large as `element`.
    ArrayRepeat,
    /// `array_resize(list, n [, value])`: n elements.
    ArrayResize,
    /// `range` / `generate_series([start,] stop [, step])`: a list of
    /// (stop - start) / step elements.
    Series,
    /// `levenshtein(a, b)`: no larger a result, but a step for every pair
    /// of characters of a and b, in one call that cannot be stopped.
    Distance,
}

/// The functions that are bounded, by the name they are registered under.
const BOUNDED: [(&str, Growth); 10] = [
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("replace", Growth::Replace),
    ("regexp_replace", Growth::RegexpReplace),
    ("array_repeat", Growth::ArrayRepeat),
    ("array_resize", Growth::ArrayResize),
    ("range", Growth::Series),
    ("generate_series", Growth::Series),
    ("levenshtein", Growth::Distance),
];

/// Replaces each function of [`BOUNDED`] that `state` has with its bounded
/// wrapper (under its aliases too).
pub(super) fn register(state: &mut SessionState) -> Result<()> {
    for (name, growth) in BOUNDED {
        let Some(function) = state.scalar_functions().get(name).cloned() else {
            continue;
        };
        let bounded = Bounded {
            inner: Arc::clone(function.inner()),
            growth,
        };
        state.register_udf(Arc::new(ScalarUDF::new_from_impl(bounded)))?;
    }
    Ok(())
}

/// A function whose result is sized from its arguments before it runs.
#[derive(Debug)]
struct Bounded {
    inner: Arc<dyn ScalarUDFImpl>,
    growth: Growth,
}

impl PartialEq for Bounded {
    fn eq(&self, other: &Self) -> bool {
        self.growth == other.growth && self.inner.dyn_eq(&*other.inner as &dyn Any)
    }
}

impl Eq for Bounded {}

impl Hash for Bounded {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.growth.hash(state);
        self.inner.dyn_hash(state);
    }
}

impl Bounded {
    /// Fails when the result for `args` could pass [`MAX_RESULT_BYTES`].
    fn check(&self, args: &ScalarFunctionArgs) -> Result<()> {
        let Some(bytes) = result_bytes(self.growth, &args.args, args.number_rows) else {
            return Ok(());
        };
        if bytes <= MAX_RESULT_BYTES {
            return Ok(());
        }
        let (name, rows) = (self.inner.name(), args.number_rows);
        Err(DataFusionError::ResourcesExhausted(match self.growth {
            Growth::Distance => format!(
                "{name}() would compare up to {bytes} pairs of characters for {rows} row(s), \
                 more than the {MAX_RESULT_BYTES} one call may compare"
            ),
            _ => format!(
                "{name}() would produce up to {} for {rows} row(s), more than the {} one call may produce",
                human_bytes(bytes),
                human_bytes(MAX_RESULT_BYTES),
            ),
        }))
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        let updated = self.inner.with_updated_config(config)?;
        Some(ScalarUDF::new_from_impl(Bounded {
            inner: Arc::clone(updated.inner()),
            growth: self.growth,
        }))
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn is_strict(&self) -> bool {
        self.inner.is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        self.check(&args)?;
        self.inner.invoke_with_args(args)
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        self.inner.simplify(args, info)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.preserves_lex_ordering(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

/// An argument's value at each row: the same for every row (a constant),
/// or one each. None where it is null.
enum Values {
    Same(Option<i64>),
    Each(Int64Array),
}

impl Values {
    fn at(&self, row: usize) -> Option<i64> {
        match self {
            Values::Same(value) => *value,
            Values::Each(values) => values.is_valid(row).then(|| values.value(row)),
        }
    }

    /// `f(array)` as values, `f` applied to a constant once (never to the
    /// constant repeated for every row, which could itself be huge).
    fn of(arg: &ColumnarValue, f: impl Fn(&ArrayRef) -> Option<ArrayRef>) -> Option<Values> {
        let (array, same) = match arg {
            ColumnarValue::Scalar(scalar) => (scalar.to_array_of_size(1).ok()?, true),
            ColumnarValue::Array(array) => (Arc::clone(array), false),
        };
        let values = cast(&f(&array)?, &DataType::Int64).ok()?;
        let values = values
            .as_primitive_opt::<arrow::datatypes::Int64Type>()?
            .clone();
        Some(if same {
            Values::Same(values.is_valid(0).then(|| values.value(0)))
        } else {
            Values::Each(values)
        })
    }

    /// The argument as integers; None if it is not a number.
    fn integers(arg: &ColumnarValue) -> Option<Values> {
        Values::of(arg, |array| {
            array.data_type().is_integer().then(|| Arc::clone(array))
        })
    }

    /// The length of each value (bytes of a string, elements of a list);
    /// None for any other type.
    fn lengths(arg: &ColumnarValue) -> Option<Values> {
        Values::of(arg, |array| length(array).ok())
    }

    /// Dates and timestamps as nanoseconds since the epoch.
    fn instants(arg: &ColumnarValue) -> Option<Values> {
        Values::of(arg, |array| {
            cast(array, &DataType::Timestamp(TimeUnit::Nanosecond, None)).ok()
        })
    }

    /// Intervals as nanoseconds, a month counted as 30 days.
    fn steps(arg: &ColumnarValue) -> Option<Values> {
        Values::of(arg, |array| {
            let intervals = cast(array, &DataType::Interval(IntervalUnit::MonthDayNano)).ok()?;
            let intervals =
                intervals.as_primitive_opt::<arrow::datatypes::IntervalMonthDayNanoType>()?;
            let nanos: Int64Array =
                intervals.unary_opt::<_, arrow::datatypes::Int64Type>(|interval| {
                    let nanos = i128::from(interval.months) * 30 * NANOS_PER_DAY
                        + i128::from(interval.days) * NANOS_PER_DAY
                        + i128::from(interval.nanoseconds);
                    i64::try_from(nanos).ok()
                });
            Some(Arc::new(nanos) as ArrayRef)
        })
    }
}

/// The most bytes `growth`'s function produces for `args` over `rows`
/// rows; None when the arguments are of a shape this does not size (the
/// function then runs unchecked, as it would have).
fn result_bytes(growth: Growth, args: &[ColumnarValue], rows: usize) -> Option<u64> {
    // A value's size from its parts, never below zero.
    let size = |value: Option<i64>| u128::try_from(value.unwrap_or(0)).unwrap_or(0);
    let arg = |index: usize| args.get(index);
    let per_row: Box<dyn Fn(usize) -> u128> = match growth {
        Growth::Repeat => {
            let (text, times) = (Values::lengths(arg(0)?)?, Values::integers(arg(1)?)?);
            Box::new(move |row| size(text.at(row)) * size(times.at(row)))
        }
        Growth::Pad => {
            let (text, width) = (Values::lengths(arg(0)?)?, Values::integers(arg(1)?)?);
            Box::new(move |row| size(text.at(row)).max(size(width.at(row))))
        }
        Growth::Replace => {
            let text = Values::lengths(arg(0)?)?;
            let (from, to) = (Values::lengths(arg(1)?)?, Values::lengths(arg(2)?)?);
            Box::new(move |row| {
                let text = size(text.at(row));
                text + (text / size(from.at(row)).max(1) + 1) * size(to.at(row))
            })
        }
        Growth::RegexpReplace => {
            let (text, replacement) = (Values::lengths(arg(0)?)?, Values::lengths(arg(2)?)?);
            // Each match adds the replacement; each reference to a group in
            // it (two characters at least) adds at most the text over all
            // matches, which do not overlap.
            Box::new(move |row| {
                let text = size(text.at(row));
                text + (2 * text + 1) * size(replacement.at(row))
            })
        }
        Growth::ArrayRepeat => {
            let times = Values::integers(arg(1)?)?;
            // A list repeated counts its elements.
            let element = Values::lengths(arg(0)?);
            Box::new(move |row| {
                let element = element.as_ref().map_or(1, |e| size(e.at(row)).max(1));
                element * size(times.at(row)) * u128::from(ELEMENT_BYTES)
            })
        }
        Growth::ArrayResize => {
            let length = Values::integers(arg(1)?)?;
            Box::new(move |row| size(length.at(row)) * u128::from(ELEMENT_BYTES))
        }
        Growth::Series => series(args)?,
        // Pairs of characters compared, counted as bytes.
        Growth::Distance => {
            let (a, b) = (Values::lengths(arg(0)?)?, Values::lengths(arg(1)?)?);
            Box::new(move |row| size(a.at(row)) * size(b.at(row)))
        }
    };
    let total = (0..rows).fold(0_u128, |total, row| total.saturating_add(per_row(row)));
    Some(u64::try_from(total).unwrap_or(u64::MAX))
}

/// The bytes of each row's `range` / `generate_series` list.
fn series(args: &[ColumnarValue]) -> Option<Box<dyn Fn(usize) -> u128>> {
    let numeric = args.first()?.data_type().is_integer();
    let (start, stop, step) = match (args, numeric) {
        ([stop], true) => (Values::Same(Some(0)), Values::integers(stop)?, None),
        ([start, stop], true) => (Values::integers(start)?, Values::integers(stop)?, None),
        ([start, stop, step], true) => (
            Values::integers(start)?,
            Values::integers(stop)?,
            Some(Values::integers(step)?),
        ),
        // Dates and timestamps step by an interval, a day unless given.
        ([start, stop], false) => (Values::instants(start)?, Values::instants(stop)?, None),
        ([start, stop, step], false) => (
            Values::instants(start)?,
            Values::instants(stop)?,
            Some(Values::steps(step)?),
        ),
        _ => return None,
    };
    let default_step = if numeric { 1 } else { NANOS_PER_DAY };
    Some(Box::new(move |row| {
        let (Some(start), Some(stop)) = (start.at(row), stop.at(row)) else {
            return 0;
        };
        let step = step
            .as_ref()
            .map_or(Some(default_step), |s| s.at(row).map(i128::from))
            .unwrap_or(default_step)
            .unsigned_abs()
            .max(1);
        let span = (i128::from(stop) - i128::from(start)).unsigned_abs();
        (span / step + 1) * u128::from(ELEMENT_BYTES)
    }))
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
