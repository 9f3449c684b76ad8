package org.effllm.demo

import android.os.Bundle
import android.os.SystemClock
import android.view.View
import android.widget.AdapterView
import android.widget.ArrayAdapter
import android.widget.Button
import android.widget.EditText
import android.widget.ScrollView
import android.widget.Spinner
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import java.io.File
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

/**
 * Pick a model (.pte) and a tokenizer on the device, type a prompt, watch the text stream in with
 * its tokens/s. ExecuTorch's LlmModule runs the model (its C++ TextLLMRunner: tokenizer, prefill,
 * decode, sampling); this class only wires it to the screen. All LlmModule calls run on one
 * background thread; callbacks arrive on it and are posted to the UI thread.
 */
class MainActivity : AppCompatActivity(), LlmCallback {
    private val worker: ExecutorService = Executors.newSingleThreadExecutor()
    private var module: LlmModule? = null
    private var models: List<File> = emptyList()
    private var tokenizers: List<File> = emptyList()

    @Volatile private var tokenCount = 0
    @Volatile private var firstTokenAt = 0L

    private lateinit var modelSpinner: Spinner
    private lateinit var tokenizerSpinner: Spinner
    private lateinit var temperatureInput: EditText
    private lateinit var seqLenInput: EditText
    private lateinit var promptInput: EditText
    private lateinit var loadButton: Button
    private lateinit var generateButton: Button
    private lateinit var stopButton: Button
    private lateinit var statsText: TextView
    private lateinit var outputText: TextView
    private lateinit var outputScroll: ScrollView

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        modelSpinner = findViewById(R.id.modelSpinner)
        tokenizerSpinner = findViewById(R.id.tokenizerSpinner)
        temperatureInput = findViewById(R.id.temperatureInput)
        seqLenInput = findViewById(R.id.seqLenInput)
        promptInput = findViewById(R.id.promptInput)
        loadButton = findViewById(R.id.loadButton)
        generateButton = findViewById(R.id.generateButton)
        stopButton = findViewById(R.id.stopButton)
        statsText = findViewById(R.id.statsText)
        outputText = findViewById(R.id.outputText)
        outputScroll = findViewById(R.id.outputScroll)

        findViewById<Button>(R.id.rescanButton).setOnClickListener { rescan() }
        loadButton.setOnClickListener { load() }
        generateButton.setOnClickListener { generate() }
        stopButton.setOnClickListener { module?.stop() }
        modelSpinner.onItemSelectedListener =
            object : AdapterView.OnItemSelectedListener {
                override fun onItemSelected(parent: AdapterView<*>?, view: View?, position: Int, id: Long) {
                    // follow the model with the tokenizer beside it
                    val tokenizer = ModelFiles.tokenizerFor(models[position], tokenizers) ?: return
                    tokenizerSpinner.setSelection(tokenizers.indexOf(tokenizer))
                    generateButton.isEnabled = false
                }

                override fun onNothingSelected(parent: AdapterView<*>?) {}
            }
        rescan()
    }

    private fun rescan() {
        val roots = ModelFiles.roots(getExternalFilesDir(null))
        models = ModelFiles.models(roots)
        tokenizers = ModelFiles.tokenizers(roots)
        modelSpinner.adapter = adapter(models.map(ModelFiles::label))
        tokenizerSpinner.adapter = adapter(tokenizers.map(ModelFiles::label))
        loadButton.isEnabled = models.isNotEmpty() && tokenizers.isNotEmpty()
        statsText.text = if (models.isEmpty()) getString(R.string.no_files) else "${models.size} model(s) found"
    }

    private fun adapter(items: List<String>) =
        ArrayAdapter(this, android.R.layout.simple_spinner_item, items).also {
            it.setDropDownViewResource(android.R.layout.simple_spinner_dropdown_item)
        }

    private fun load() {
        val model = models.getOrNull(modelSpinner.selectedItemPosition) ?: return
        val tokenizer = tokenizers.getOrNull(tokenizerSpinner.selectedItemPosition) ?: return
        val temperature = temperatureInput.text.toString().toFloatOrNull() ?: 0f
        setBusy(true)
        statsText.text = "loading ${ModelFiles.label(model)} ..."
        worker.execute {
            val message =
                try {
                    module?.resetNative()
                    module = null
                    val started = SystemClock.elapsedRealtime()
                    val loaded = LlmModule(model.absolutePath, tokenizer.absolutePath, temperature)
                    // load() returns a status code in the Java API and throws in the Kotlin one
                    val status: Any = loaded.load()
                    if (status is Int && status != 0) throw IllegalStateException("load() returned error $status")
                    module = loaded
                    "loaded ${ModelFiles.label(model)} in ${SystemClock.elapsedRealtime() - started} ms"
                } catch (e: Exception) {
                    "cannot load ${model.name} with ${tokenizer.name}: ${e.message}"
                }
            runOnUiThread {
                statsText.text = message
                setBusy(false)
            }
        }
    }

    private fun generate() {
        val loaded = module ?: return
        val prompt = promptInput.text.toString()
        val seqLen = seqLenInput.text.toString().toIntOrNull() ?: 256
        outputText.text = ""
        statsText.text = ""
        tokenCount = 0
        firstTokenAt = 0L
        setBusy(true)
        stopButton.isEnabled = true
        worker.execute {
            val error =
                try {
                    // echo = false: onResult receives the generated text only; seqLen = prompt + new tokens
                    val status: Any = loaded.generate(prompt, seqLen, this, false)
                    if (status is Int && status != 0) "generate() returned error $status" else null
                } catch (e: Exception) {
                    "generation failed: ${e.message}"
                }
            runOnUiThread {
                error?.let { statsText.text = it }
                setBusy(false)
            }
        }
    }

    /** One decoded piece of text per generated token, streamed as it comes. */
    override fun onResult(result: String) {
        val now = SystemClock.elapsedRealtime()
        if (tokenCount == 0) firstTokenAt = now
        tokenCount += 1
        val elapsed = now - firstTokenAt
        val live = if (tokenCount > 1 && elapsed > 0) "%.1f tok/s".format((tokenCount - 1) * 1000.0 / elapsed) else ""
        runOnUiThread {
            outputText.append(result)
            statsText.text = "$tokenCount tokens  $live"
            outputScroll.post { outputScroll.fullScroll(View.FOCUS_DOWN) }
        }
    }

    /** The runner's statistics (JSON, see RunStats) once generate() finishes. */
    override fun onStats(stats: String) {
        val parsed = RunStats.parse(stats) ?: return
        runOnUiThread { statsText.text = parsed.summary() }
    }

    private fun setBusy(busy: Boolean) {
        loadButton.isEnabled = !busy && models.isNotEmpty()
        generateButton.isEnabled = !busy && module != null
        stopButton.isEnabled = busy && module != null
        modelSpinner.isEnabled = !busy
        tokenizerSpinner.isEnabled = !busy
    }

    override fun onDestroy() {
        module?.stop()
        worker.execute { module?.resetNative() }
        worker.shutdown()
        super.onDestroy()
    }
}
