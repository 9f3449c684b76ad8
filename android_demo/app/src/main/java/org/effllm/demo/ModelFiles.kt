package org.effllm.demo

import java.io.File

/**
 * Where the app looks for models and what it expects there: exactly what effllm-export writes.
 *
 * Each ExecuTorch variant of an export is a directory holding `model.pte` and `tokenizer.json`
 * (OUT/executorch/, OUT/executorch-8da4w/). `adb push` copies those directories under
 * [DEVICE_DIR], the same place `effllm-bench --target android` uses; the app's own external files
 * directory (Android/data/org.effllm.demo/files/) works too.
 */
object ModelFiles {
    const val DEVICE_DIR = "/data/local/tmp/effllm"
    const val MODEL_FILE = "model.pte"
    const val TOKENIZER_FILE = "tokenizer.json"

    /** Other tokenizer files ExecuTorch's runner reads (SentencePiece / tiktoken / llama2.c). */
    private val OTHER_TOKENIZERS = listOf("tokenizer.model", "tokenizer.bin")

    fun roots(appFiles: File?): List<File> = listOfNotNull(File(DEVICE_DIR), appFiles)

    /** The roots and their subdirectories (one per exported variant). */
    private fun directories(roots: List<File>): List<File> =
        roots.flatMap { root -> listOf(root) + (root.listFiles()?.filter { it.isDirectory }?.sortedBy { it.name } ?: emptyList()) }

    /** Every .pte file found, `model.pte` of each variant directory first. */
    fun models(roots: List<File>): List<File> =
        directories(roots)
            .flatMap { dir -> dir.listFiles()?.filter { it.isFile && it.name.endsWith(".pte") } ?: emptyList() }
            .distinctBy { it.absolutePath }
            .sortedWith(compareBy({ it.name != MODEL_FILE }, { it.absolutePath }))

    fun tokenizers(roots: List<File>): List<File> =
        directories(roots)
            .flatMap { dir ->
                dir.listFiles()?.filter { it.isFile && (it.name == TOKENIZER_FILE || it.name in OTHER_TOKENIZERS) }
                    ?: emptyList()
            }
            .distinctBy { it.absolutePath }

    /** The tokenizer beside the model (effllm-export writes tokenizer.json next to model.pte), else the first one. */
    fun tokenizerFor(model: File, tokenizers: List<File>): File? =
        tokenizers.firstOrNull { it.parentFile == model.parentFile } ?: tokenizers.firstOrNull()

    /** How a model is shown in the picker: its variant directory and file name. */
    fun label(file: File): String = "${file.parentFile?.name ?: ""}/${file.name}"
}
