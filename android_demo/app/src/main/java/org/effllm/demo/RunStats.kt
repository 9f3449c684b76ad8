package org.effllm.demo

import org.json.JSONException
import org.json.JSONObject

/**
 * The runner's statistics after a generate(): the JSON that LlmCallback.onStats receives, the same
 * record ExecuTorch's llama runner prints as `PyTorchObserver {json}` (extension/llm/runner/stats.h).
 * Rates follow the runner's own report, as effllm-bench --target android computes them.
 */
data class RunStats(
    val promptTokens: Long,
    val generatedTokens: Long,
    val loadMs: Long?,
    val firstTokenMs: Long?,
    val prefillTokensPerSecond: Double?,
    val decodeTokensPerSecond: Double?
) {
    fun summary(): String {
        val parts = mutableListOf("$promptTokens prompt + $generatedTokens new tokens")
        prefillTokensPerSecond?.let { parts += "prefill %.1f tok/s".format(it) }
        decodeTokensPerSecond?.let { parts += "decode %.1f tok/s".format(it) }
        firstTokenMs?.let { parts += "first token $it ms" }
        loadMs?.let { if (it > 0) parts += "load $it ms" }
        return parts.joinToString(" · ")
    }

    companion object {
        fun parse(json: String): RunStats? =
            try {
                val o = JSONObject(json)
                val scale = o.optDouble("SCALING_FACTOR_UNITS_PER_SECOND", 1000.0)
                fun span(start: String, end: String): Long? =
                    if (o.has(start) && o.has(end)) (o.getLong(end) - o.getLong(start)).takeIf { it >= 0 } else null
                fun rate(tokens: Long, units: Long?): Double? =
                    units?.takeIf { it > 0 }?.let { tokens * scale / it }
                val prompt = o.optLong("prompt_tokens")
                val generated = o.optLong("generated_tokens")
                RunStats(
                    promptTokens = prompt,
                    generatedTokens = generated,
                    loadMs = span("model_load_start_ms", "model_load_end_ms"),
                    firstTokenMs = span("inference_start_ms", "first_token_ms"),
                    prefillTokensPerSecond = rate(prompt, span("inference_start_ms", "prompt_eval_end_ms")),
                    decodeTokensPerSecond = rate(generated, span("prompt_eval_end_ms", "inference_end_ms"))
                )
            } catch (e: JSONException) {
                null
            }
    }
}
