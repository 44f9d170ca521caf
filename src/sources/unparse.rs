//! The dialects the SQL sent to a source is written in: DataFusion's for
//! each database, with two changes.
//!
//! Every derived table is named. The unparser writes a projection over a
//! sort it does not select the keys of as a derived table with the sort
//! inside; unnamed, its columns are out of scope outside (SQLite refuses
//! the statement), and the order it is made in need not be the order its
//! rows leave in (a remote DataFusion drops it). Named, the pushdown's
//! `OrderOutside` can move that order to the query around it.
//!
//! And meshgate's markers are written as SQL: for PostgreSQL, strings
//! marked to be compared in byte order as `COLLATE "C"`
//! (see [`super::collation`]).

use std::sync::Arc;

use arrow::datatypes::TimeUnit;
use chrono::DateTime;
use datafusion::error::Result;
use datafusion::logical_expr::Expr;
use datafusion::sql::unparser::Unparser;
use datafusion::sql::unparser::dialect::{
    CharacterLengthStyle, DateFieldExtractStyle, DefaultDialect, Dialect, DistinctFromStyle,
    IntervalStyle, PostgreSqlDialect, SqliteDialect,
};
use sqlparser::ast;

/// Writes meshgate's marker functions, or `None` for any other function.
type Markers = fn(&Unparser, &str, &[Expr]) -> Result<Option<ast::Expr>>;

/// A source's unparser dialect: `inner` with derived tables named and
/// `markers` written.
pub(crate) struct SourceDialect {
    inner: &'static dyn Dialect,
    markers: Markers,
}

static POSTGRES_INNER: PostgreSqlDialect = PostgreSqlDialect {};
static SQLITE_INNER: SqliteDialect = SqliteDialect {};
static DEFAULT_INNER: DefaultDialect = DefaultDialect {};

fn no_markers(_: &Unparser, _: &str, _: &[Expr]) -> Result<Option<ast::Expr>> {
    Ok(None)
}

pub(crate) static POSTGRES: SourceDialect = SourceDialect {
    inner: &POSTGRES_INNER,
    markers: super::collation::marker_to_sql,
};
pub(crate) static SQLITE: SourceDialect = SourceDialect {
    inner: &SQLITE_INNER,
    markers: no_markers,
};
pub(crate) static FLIGHT_SQL: SourceDialect = SourceDialect {
    inner: &DEFAULT_INNER,
    markers: no_markers,
};

impl Dialect for SourceDialect {
    fn requires_derived_table_alias(&self) -> bool {
        true
    }

    fn scalar_function_to_sql_overrides(
        &self,
        unparser: &Unparser,
        func_name: &str,
        args: &[Expr],
    ) -> Result<Option<ast::Expr>> {
        match (self.markers)(unparser, func_name, args)? {
            Some(sql) => Ok(Some(sql)),
            None => self
                .inner
                .scalar_function_to_sql_overrides(unparser, func_name, args),
        }
    }

    // The rest as the database's own dialect has it.

    fn identifier_quote_style(&self, identifier: &str) -> Option<char> {
        self.inner.identifier_quote_style(identifier)
    }

    fn use_array_keyword_for_array_literals(&self) -> bool {
        self.inner.use_array_keyword_for_array_literals()
    }

    fn supports_nulls_first_in_sort(&self) -> bool {
        self.inner.supports_nulls_first_in_sort()
    }

    fn use_timestamp_for_date64(&self) -> bool {
        self.inner.use_timestamp_for_date64()
    }

    fn interval_style(&self) -> IntervalStyle {
        self.inner.interval_style()
    }

    fn float64_ast_dtype(&self) -> ast::DataType {
        self.inner.float64_ast_dtype()
    }

    fn utf8_cast_dtype(&self) -> ast::DataType {
        self.inner.utf8_cast_dtype()
    }

    fn large_utf8_cast_dtype(&self) -> ast::DataType {
        self.inner.large_utf8_cast_dtype()
    }

    fn date_field_extract_style(&self) -> DateFieldExtractStyle {
        self.inner.date_field_extract_style()
    }

    fn distinct_from_style(&self) -> DistinctFromStyle {
        self.inner.distinct_from_style()
    }

    fn character_length_style(&self) -> CharacterLengthStyle {
        self.inner.character_length_style()
    }

    fn int64_cast_dtype(&self) -> ast::DataType {
        self.inner.int64_cast_dtype()
    }

    fn int8_cast_dtype(&self) -> ast::DataType {
        self.inner.int8_cast_dtype()
    }

    fn int32_cast_dtype(&self) -> ast::DataType {
        self.inner.int32_cast_dtype()
    }

    fn timestamp_cast_dtype(&self, time_unit: &TimeUnit, tz: &Option<Arc<str>>) -> ast::DataType {
        self.inner.timestamp_cast_dtype(time_unit, tz)
    }

    fn date32_cast_dtype(&self) -> ast::DataType {
        self.inner.date32_cast_dtype()
    }

    fn supports_column_alias_in_table_alias(&self) -> bool {
        self.inner.supports_column_alias_in_table_alias()
    }

    fn division_operator(&self) -> ast::BinaryOperator {
        self.inner.division_operator()
    }

    fn higher_order_function_to_sql_overrides(
        &self,
        unparser: &Unparser,
        func_name: &str,
        args: &[Expr],
    ) -> Result<Option<ast::Expr>> {
        self.inner
            .higher_order_function_to_sql_overrides(unparser, func_name, args)
    }

    fn window_func_support_window_frame(
        &self,
        func_name: &str,
        start_bound: &ast::WindowFrameBound,
        end_bound: &ast::WindowFrameBound,
    ) -> bool {
        self.inner
            .window_func_support_window_frame(func_name, start_bound, end_bound)
    }

    fn full_qualified_col(&self) -> bool {
        self.inner.full_qualified_col()
    }

    fn unnest_as_table_factor(&self) -> bool {
        self.inner.unnest_as_table_factor()
    }

    fn unnest_as_lateral_flatten(&self) -> bool {
        self.inner.unnest_as_lateral_flatten()
    }

    fn col_alias_overrides(&self, alias: &str) -> Result<Option<String>> {
        self.inner.col_alias_overrides(alias)
    }

    fn supports_qualify(&self) -> bool {
        self.inner.supports_qualify()
    }

    fn timestamp_with_tz_to_string(
        &self,
        dt: DateTime<arrow::array::timezone::Tz>,
        unit: TimeUnit,
    ) -> String {
        self.inner.timestamp_with_tz_to_string(dt, unit)
    }

    fn supports_empty_select_list(&self) -> bool {
        self.inner.supports_empty_select_list()
    }

    fn string_literal_to_sql(&self, s: &str) -> Option<ast::Expr> {
        self.inner.string_literal_to_sql(s)
    }
}
