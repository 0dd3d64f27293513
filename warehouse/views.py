"""Views for the joins data engineers ask for most. Later stages add theirs here."""

from __future__ import annotations

import duckdb

VIEWS: dict[str, str] = {
    "v_stage_counts": """
        SELECT run_id, stage, sum(inputs) AS inputs, sum(outputs) AS outputs,
               sum(rejected) AS rejected, sum(skipped) AS skipped, round(sum(wall_s), 3) AS wall_s,
               sum(inputs) = sum(outputs) + sum(rejected) + sum(skipped) AS balanced
        FROM audit_stage_counts GROUP BY run_id, stage
    """,
    "v_rejection_reasons": """
        SELECT stage, reason_code, count(*) AS n, min(entity_id) AS example_entity
        FROM int_rejections GROUP BY stage, reason_code
    """,
    # ---- operators' and data engineers' joins (docs/SQL.md answers its questions with these) ----
    # One row per pipeline flow run: audit_runs (state, reason, stage totals) with the run's LLM spend and
    # data check results; runs that left only audit_stage_counts rows (stages called outside the flow, or
    # runs from before audit_runs) are listed from those, with no state.
    "v_runs": """
        WITH spend AS (
            SELECT run_id, count(*) AS llm_calls, round(sum(cost_usd), 6) AS llm_cost_usd
            FROM int_llm_calls GROUP BY run_id
        ), checks AS (
            SELECT run_id, count(*) FILTER (WHERE passed) AS checks_passed,
                   count(*) FILTER (WHERE NOT passed AND severity = 'error') AS checks_failed,
                   count(*) FILTER (WHERE NOT passed AND severity = 'warn') AS checks_warned,
                   list(DISTINCT check_name ORDER BY check_name) FILTER (WHERE NOT passed) AS failed_checks
            FROM fct_check_results GROUP BY run_id
        ), audited AS (
            SELECT run_id, flow, state, reason, started_at, finished_at, requested_stages,
                   [s.stage FOR s IN stages] AS stages, stages AS stage_counts
            FROM audit_runs
        ), per_stage AS (
            SELECT run_id, stage, min(finished_at - to_microseconds(CAST(wall_s * 1e6 AS BIGINT))) AS started_at,
                   max(finished_at) AS finished_at,
                   struct_pack(stage := stage, batches := CAST(count(*) AS BIGINT), inputs := CAST(sum(inputs) AS BIGINT), outputs := CAST(sum(outputs) AS BIGINT),
                               rejected := CAST(sum(rejected) AS BIGINT), skipped := CAST(sum(skipped) AS BIGINT),
                               wall_s := round(sum(wall_s), 3)) AS counts
            FROM audit_stage_counts WHERE run_id NOT IN (SELECT run_id FROM audit_runs)
            GROUP BY run_id, stage
        ), unaudited AS (
            SELECT run_id, NULL::VARCHAR AS flow, NULL::VARCHAR AS state, NULL::VARCHAR AS reason,
                   min(started_at) AS started_at, max(finished_at) AS finished_at,
                   NULL::VARCHAR[] AS requested_stages,
                   list(stage ORDER BY list_position(['ingest', 'label', 'tasks', 'mine', 'datasets'], stage))
                       AS stages,
                   list(counts ORDER BY list_position(['ingest', 'label', 'tasks', 'mine', 'datasets'], stage))
                       AS stage_counts
            FROM per_stage GROUP BY run_id
        ), runs AS (
            SELECT * FROM audited UNION ALL BY NAME SELECT * FROM unaudited
        )
        SELECT r.run_id, r.flow, r.state, r.reason, r.started_at, r.finished_at, r.requested_stages, r.stages,
               r.stage_counts,
               CAST(list_sum([s.inputs FOR s IN r.stage_counts]) AS BIGINT) AS inputs,
               CAST(list_sum([s.outputs FOR s IN r.stage_counts]) AS BIGINT) AS outputs,
               CAST(list_sum([s.rejected FOR s IN r.stage_counts]) AS BIGINT) AS rejected,
               CAST(list_sum([s.skipped FOR s IN r.stage_counts]) AS BIGINT) AS skipped,
               round(list_sum([s.wall_s FOR s IN r.stage_counts]), 3) AS wall_s,
               coalesce(sp.llm_calls, 0) AS llm_calls, coalesce(sp.llm_cost_usd, 0) AS llm_cost_usd,
               coalesce(c.checks_passed, 0) AS checks_passed, coalesce(c.checks_failed, 0) AS checks_failed,
               coalesce(c.checks_warned, 0) AS checks_warned, c.failed_checks
        FROM runs r
        LEFT JOIN spend sp USING (run_id)
        LEFT JOIN checks c USING (run_id)
    """,
    "v_study_labels": """
        SELECT study_id,
               map_from_entries(list(struct_pack(k := observation, v := value) ORDER BY observation)) AS labels,
               list(observation ORDER BY observation) FILTER (WHERE value = 'positive') AS positive,
               any_value(source) AS source
        FROM int_labels GROUP BY study_id
    """,
    "v_chain_steps": """
        SELECT c.chain_id, c.sample_id, c.study_id, c.task, s.split, s.question, s.options, s.answer_letter,
               s.answer_text, c.extractor, c.protocol, c.model, c.prompt_version, c.n_steps, c.refine_rounds,
               st.step_index, st.kind, st.text AS step_text, st.findings, st.evidence,
               l.positive AS study_positive_labels, l.labels AS study_labels,
               c.run_id, c.batch_id, c.code_version
        FROM int_chains c
        JOIN int_chain_steps st ON st.chain_id = c.chain_id
        LEFT JOIN int_vqa_samples s ON s.sample_id = c.sample_id
        LEFT JOIN v_study_labels l ON l.study_id = c.study_id
    """,
    # One row per evidence quote of an accepted chain, checked against the report text.
    "v_chain_evidence": """
        SELECT x.chain_id, x.sample_id, c.study_id, c.task, x.step_index, x.kind, x.step_text,
               x.e.quote AS quote, x.e.start AS quote_start, x.e."end" AS quote_end,
               -- offsets index the report, a newline, then the prior report (extractors/chains/verify.py)
               CASE WHEN x.e.start > length(r.text) THEN 'prior_report' ELSE 'report' END AS quote_source,
               substr(r.text || coalesce(chr(10) || p.text, ''), x.e.start + 1, x.e."end" - x.e.start) = x.e.quote
                   AS quote_matches,
               c.run_id, c.code_version
        FROM (SELECT chain_id, sample_id, step_index, kind, text AS step_text, unnest(evidence) AS e
              FROM int_chain_steps) x
        JOIN int_chains c ON c.chain_id = x.chain_id
        LEFT JOIN int_vqa_samples s ON s.sample_id = x.sample_id
        LEFT JOIN raw_reports r ON r.study_id = c.study_id
        LEFT JOIN raw_reports p ON p.study_id = s.prior_study_id
    """,
    "v_llm_spend": """
        SELECT run_id, stage, model, prompt_version, count(*) AS calls,
               count(*) FILTER (WHERE cache_hit) AS cache_hits,
               round(count(*) FILTER (WHERE cache_hit) / count(*), 4) AS cache_hit_rate,
               count(*) FILTER (WHERE status <> 'ok') AS failed,
               sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
               round(sum(cost_usd), 6) AS cost_usd, count(DISTINCT sample_id) AS samples,
               min(created_at) AS first_call_at, max(created_at) AS last_call_at
        FROM int_llm_calls GROUP BY run_id, stage, model, prompt_version
    """,
    "v_rejections": """
        SELECT r.rejection_id, r.stage, r.entity_id, r.reason_code, r.detail, r.raw_output,
               s.task, coalesce(s.study_id, CASE WHEN s.sample_id IS NULL AND r.stage IN ('ingest', 'label', 'tasks')
                                               THEN r.entity_id END) AS study_id,
               s.split, s.question, s.answer_text,
               l.prompt_version, l.model, coalesce(l.calls, 0) AS llm_calls, coalesce(l.cost_usd, 0) AS llm_cost_usd,
               r.run_id, r.batch_id, r.code_version
        FROM int_rejections r
        LEFT JOIN int_vqa_samples s ON s.sample_id = r.entity_id
        LEFT JOIN (SELECT run_id, sample_id, min(prompt_version) AS prompt_version, min(model) AS model,
                          count(*) AS calls, sum(cost_usd) AS cost_usd
                   FROM int_llm_calls GROUP BY run_id, sample_id) l
               ON l.run_id = r.run_id AND l.sample_id = r.entity_id
    """,
    # One row per sample the mine stage decided on. A rejected sample's prompt version is that of its
    # LLM calls; the rule backend makes none, so it takes the version of the chains its batch accepted.
    "v_mine_outcomes": """
        SELECT sample_id, task, 'accepted' AS outcome, NULL AS reason_code, extractor, prompt_version,
               run_id, batch_id, code_version
        FROM v_chain_steps WHERE step_index = 0
        UNION ALL
        SELECT r.entity_id, r.task, 'rejected', r.reason_code,
               CASE WHEN r.llm_calls > 0 THEN 'llm' ELSE b.extractor END,
               coalesce(r.prompt_version, b.prompt_version), r.run_id, r.batch_id, r.code_version
        FROM v_rejections r
        LEFT JOIN (SELECT run_id, batch_id, min(extractor) AS extractor, min(prompt_version) AS prompt_version
                   FROM int_chains GROUP BY run_id, batch_id) b
               ON b.run_id = r.run_id AND b.batch_id = r.batch_id
        WHERE r.stage = 'mine'
    """,
}

# One line per view for the catalog (warehouse/catalog_doc.py) and the DuckDB comments.
DESCRIPTIONS: dict[str, str] = {
    "v_stage_counts": "Per run and stage: inputs, outputs, rejected, skipped, wall time, and whether they balance.",
    "v_rejection_reasons": "Rejections counted by stage and reason code, with one example entity.",
    "v_runs": "One row per pipeline run: state (Running/Completed/Failed/Crashed) and why it failed, when it ran, each "
              "stage's counts, LLM calls and spend, data checks passed/failed/warned (audit_runs, int_llm_calls, "
              "fct_check_results).",
    "v_study_labels": "Per study: a map observation -> label value, and the list of positive observations.",
    "v_chain_steps": "An accepted chain step by step, with its sample (question, options, answer) and the "
                     "study's labels.",
    "v_chain_evidence": "One row per evidence quote of an accepted chain, with its offsets checked against "
                        "the report (or the prior report).",
    "v_llm_spend": "LLM calls per run, stage, model and prompt version: calls, cache hits, failures, tokens, cost.",
    "v_rejections": "Dead-letter rows with the rejected sample's task, study, question and its LLM calls "
                    "(prompt version, model, cost).",
    "v_mine_outcomes": "One row per mined sample: accepted or rejected (with reason code), extractor and "
                       "prompt version.",
}


def create_all(con: duckdb.DuckDBPyConnection) -> None:
    for name, body in VIEWS.items():
        con.execute(f'CREATE OR REPLACE VIEW "{name}" AS {body}')
        if name in DESCRIPTIONS:
            con.execute(f"COMMENT ON VIEW \"{name}\" IS '{DESCRIPTIONS[name].replace(chr(39), chr(39) * 2)}'")
