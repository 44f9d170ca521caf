//! The statement guard: meshgate is read-only and sandboxed. Only queries (and
//! EXPLAIN of queries) pass; writes, DDL, COPY, settings and anything that
//! reads files or URLs are refused before planning. `?` placeholders are
//! numbered here so that `?` and `$1` both work.

use std::ops::ControlFlow;

use datafusion::sql::parser::Statement as DataFusionStatement;
use datafusion::sql::sqlparser::ast::{
    Expr, ObjectName, Statement, TableFactor, Value, Visit, Visitor, visit_expressions,
    visit_expressions_mut, visit_relations,
};

use super::QueryError;

/// Functions that read files or URLs in some engine. None is registered in
/// meshgate; naming one gets a clear refusal instead of "not found".
const FILE_FUNCTIONS: &[&str] = &[
    "read_parquet",
    "read_csv",
    "read_csv_auto",
    "read_json",
    "read_json_auto",
    "read_ndjson",
    "read_avro",
    "read_arrow",
    "read_ipc",
    "read_text",
    "read_blob",
    "read_file",
    "parquet_scan",
    "parquet_metadata",
    "parquet_schema",
    "csv_scan",
    "sniff_csv",
    "glob",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "lo_import",
    "load_file",
    "http_get",
    "url",
    "file",
];

const READ_ONLY: &str = "meshgate is read-only";

/// Most binary operators one statement may hold. A chain of N operators
/// (`a OR b OR ...`, `1 + 1 + ...`) nests N deep in every tree the planner
/// walks; past this the statement is refused instead of risking the stack.
pub(crate) const MAX_OPERATORS: usize = 500;

/// Refuses statements too complex to plan safely, counting operators on the
/// token stream (the tokenizer does not recurse, so this check cannot
/// overflow the stack itself). Nesting by parentheses and subqueries is
/// bounded separately by the parser's recursion limit.
pub(crate) fn check_complexity(sql: &str) -> Result<(), QueryError> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::keywords::Keyword;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| QueryError::Syntax(e.to_string()))?;
    let operators = tokens
        .iter()
        .filter(|token| match token {
            Token::Word(word) => matches!(
                word.keyword,
                Keyword::AND | Keyword::OR | Keyword::LIKE | Keyword::ILIKE | Keyword::IS
            ),
            Token::Plus
            | Token::Minus
            | Token::Mul
            | Token::Div
            | Token::Mod
            | Token::StringConcat
            | Token::Eq
            | Token::DoubleEq
            | Token::Neq
            | Token::Lt
            | Token::Gt
            | Token::LtEq
            | Token::GtEq
            | Token::Spaceship
            | Token::Ampersand
            | Token::Pipe
            | Token::Caret
            | Token::ShiftLeft
            | Token::ShiftRight => true,
            _ => false,
        })
        .count();
    if operators > MAX_OPERATORS {
        return Err(QueryError::Refused(format!(
            "the statement is too complex: {operators} operators (at most {MAX_OPERATORS}); use IN (...) lists or a join instead of long chains"
        )));
    }
    Ok(())
}

/// Checks that `statement` only reads products, and numbers `?` placeholders.
pub(crate) fn check_and_normalize(statement: &mut DataFusionStatement) -> Result<(), QueryError> {
    match statement {
        DataFusionStatement::Statement(inner) => check_sql_statement(inner),
        DataFusionStatement::Explain(explain) => check_and_normalize(&mut explain.statement),
        DataFusionStatement::CreateExternalTable(_) => Err(QueryError::Refused(format!(
            "CREATE EXTERNAL TABLE is refused: {READ_ONLY}; data is reached only through published products"
        ))),
        DataFusionStatement::CopyTo(_) => {
            Err(QueryError::Refused(format!("COPY is refused: {READ_ONLY}")))
        }
        DataFusionStatement::Reset(_) => Err(QueryError::Refused(
            "RESET is refused: session settings are managed by meshgate".into(),
        )),
    }
}

fn check_sql_statement(statement: &mut Statement) -> Result<(), QueryError> {
    match statement {
        Statement::Query(_) => {}
        Statement::Explain { statement, .. } => return check_sql_statement(statement),
        other => return Err(QueryError::Refused(refusal(other))),
    }
    check_reads(statement)?;
    check_table_modifiers(statement)?;
    number_placeholders(statement)
}

/// Refuses table modifiers the planner would pass over in silence, giving
/// an answer other than the one asked for: `TABLESAMPLE` (every row would
/// come back) and `WITH ORDINALITY` (no ordinal column).
fn check_table_modifiers(statement: &Statement) -> Result<(), QueryError> {
    struct Modifiers;
    impl Visitor for Modifiers {
        type Break = QueryError;
        fn pre_visit_table_factor(&mut self, table: &TableFactor) -> ControlFlow<QueryError> {
            let (sample, ordinality) = match table {
                TableFactor::Table {
                    sample,
                    with_ordinality,
                    ..
                } => (sample.is_some(), *with_ordinality),
                TableFactor::Derived { sample, .. } => (sample.is_some(), false),
                _ => (false, false),
            };
            if sample {
                return ControlFlow::Break(QueryError::Invalid(
                    "TABLESAMPLE is not supported: to sample rows, filter on random(), e.g. `WHERE random() < 0.1`".into(),
                ));
            }
            if ordinality {
                return ControlFlow::Break(QueryError::Invalid(
                    "WITH ORDINALITY is not supported: number rows with row_number() OVER ()"
                        .into(),
                ));
            }
            ControlFlow::Continue(())
        }
    }
    match statement.visit(&mut Modifiers) {
        ControlFlow::Break(error) => Err(error),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// The refusal message for a statement that is not a query.
fn refusal(statement: &Statement) -> String {
    let class = statement_class(statement);
    match class {
        "SET" => "SET is refused: session settings are managed by meshgate".into(),
        "SHOW" | "DESCRIBE" => format!(
            "{class} is not supported: use the Flight SQL metadata calls (GetDbSchemas, GetTables) to browse the mesh"
        ),
        "PREPARE" | "EXECUTE" | "DEALLOCATE" => format!(
            "{class} is not supported in SQL text: use Flight SQL prepared statements with bound parameters"
        ),
        "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "TRUNCATE" => {
            format!("{class} is refused: {READ_ONLY}")
        }
        _ => format!(
            "{class} is refused: {READ_ONLY}; only queries (SELECT, WITH, VALUES, EXPLAIN) are accepted"
        ),
    }
}

fn statement_class(statement: &Statement) -> &'static str {
    match statement {
        Statement::Insert(_) => "INSERT",
        Statement::Update { .. } => "UPDATE",
        Statement::Delete(_) => "DELETE",
        Statement::Merge { .. } => "MERGE",
        Statement::Truncate { .. } => "TRUNCATE",
        Statement::Copy { .. } | Statement::CopyIntoSnowflake { .. } => "COPY",
        Statement::CreateTable(_)
        | Statement::CreateView { .. }
        | Statement::CreateIndex(_)
        | Statement::CreateSchema { .. }
        | Statement::CreateDatabase { .. }
        | Statement::CreateFunction(_) => "CREATE",
        Statement::Drop { .. } | Statement::DropFunction { .. } => "DROP",
        Statement::AlterTable { .. } => "ALTER",
        Statement::Set(_) => "SET",
        Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowCreate { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowSchemas { .. } => "SHOW",
        Statement::ExplainTable { .. } => "DESCRIBE",
        Statement::Prepare { .. } => "PREPARE",
        Statement::Execute { .. } => "EXECUTE",
        Statement::Deallocate { .. } => "DEALLOCATE",
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. } => "transaction control",
        _ => "this statement",
    }
}

/// Refuses relations that look like paths or URLs and file-reading functions,
/// whether called as table functions (`FROM read_csv('x')`, reported as
/// relations) or as scalar functions.
fn check_reads(statement: &Statement) -> Result<(), QueryError> {
    let relations = visit_relations(statement, |name: &ObjectName| {
        for part in &name.0 {
            let text = part.to_string();
            let text = text.trim_matches(|c| c == '"' || c == '\'' || c == '`');
            if looks_like_path(text) {
                return ControlFlow::Break(QueryError::Refused(format!(
                    "`{text}` looks like a file or URL: data is reached only through published products (domain.product)"
                )));
            }
        }
        if let Some(function) = file_function(name) {
            return ControlFlow::Break(file_function_refusal(&function));
        }
        if is_introspection(name) {
            return ControlFlow::Break(QueryError::Refused(
                "information_schema is not available: list the products you may read with \
                 Flight SQL's GetDbSchemas and GetTables, or the catalog API"
                    .into(),
            ));
        }
        ControlFlow::Continue(())
    });
    if let ControlFlow::Break(error) = relations {
        return Err(error);
    }
    let functions = visit_expressions(statement, |expr: &Expr| {
        if let Expr::Function(function) = expr
            && let Some(name) = file_function(&function.name)
        {
            return ControlFlow::Break(file_function_refusal(&name));
        }
        ControlFlow::Continue(())
    });
    match functions {
        ControlFlow::Break(error) => Err(error),
        ControlFlow::Continue(()) => Ok(()),
    }
}

fn file_function(name: &ObjectName) -> Option<String> {
    let last = name.0.last()?.to_string();
    let last = last.trim_matches('"').to_ascii_lowercase();
    FILE_FUNCTIONS.contains(&last.as_str()).then_some(last)
}

/// Whether `name` is a table of the engine's `information_schema` (or
/// PostgreSQL's `pg_catalog`): no domain may take either name.
fn is_introspection(name: &ObjectName) -> bool {
    let parts = &name.0;
    parts.len() >= 2 && {
        let schema = parts[parts.len() - 2].to_string();
        let schema = schema.trim_matches('"').to_ascii_lowercase();
        schema == "information_schema" || schema == "pg_catalog"
    }
}

fn file_function_refusal(name: &str) -> QueryError {
    QueryError::Refused(format!(
        "function `{name}` reads files or URLs and is refused: data is reached only through published products"
    ))
}

fn looks_like_path(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    text.contains('/')
        || text.contains('\\')
        || lower.contains("://")
        || [
            ".parquet", ".csv", ".json", ".arrow", ".avro", ".ipc", ".ndjson", ".txt",
        ]
        .iter()
        .any(|ext| lower.ends_with(ext))
}

/// Rewrites `?` placeholders to `$1`, `$2`, ... in order of appearance.
/// Mixing `?` with numbered placeholders is refused as ambiguous.
fn number_placeholders(statement: &mut Statement) -> Result<(), QueryError> {
    let mut question_marks = 0usize;
    let mut numbered = false;
    let _ = visit_expressions_mut(statement, |expr: &mut Expr| {
        if let Expr::Value(value) = expr
            && let Value::Placeholder(text) = &mut value.value
        {
            if text == "?" {
                question_marks += 1;
                *text = format!("${question_marks}");
            } else {
                numbered = true;
            }
        }
        ControlFlow::<()>::Continue(())
    });
    if question_marks > 0 && numbered {
        return Err(QueryError::Invalid(
            "use either `?` or `$1`-style placeholders in one statement, not both".into(),
        ));
    }
    Ok(())
}
