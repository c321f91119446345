// Talking to this server: JSON settings, one streamed caption through the OpenAI-compatible endpoint, and
// the server's errors turned into plain words. Every URL is relative: the page calls its own origin only.

/** A failed request, with a message meant for a person. */
export class PlaygroundError extends Error {
  constructor(message, { status = 0, code = null, retryAfter = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

export async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: 'application/json' } });
  if (!response.ok) throw new PlaygroundError(`the server answered ${response.status} for ${url}`, { status: response.status });
  return response.json();
}

function megabytes(bytes) {
  return `${(bytes / (1024 * 1024)).toFixed(bytes < 1024 * 1024 ? 2 : 0)} MB`;
}

/** The server's error (status, OpenAI error body, Retry-After) in plain words. */
export function plainWords(status, error, retryAfter, limits) {
  const code = error?.code ?? null;
  const detail = error?.message ?? '';
  const wait = retryAfter ? `${retryAfter} second${retryAfter === '1' ? '' : 's'}` : 'a few seconds';
  let message;
  if (status === 401) {
    message = 'The server did not accept the API key. Enter its key in the API key field and try again.';
  } else if (status === 413 && code === 'image_too_large') {
    message = `The image is too large for this server (at most ${megabytes(limits.max_image_bytes)} and `
      + `${(limits.max_image_pixels / 1e6).toFixed(1)} million pixels). Use a smaller image.`;
  } else if (status === 413) {
    message = 'The request is too large for this server. Use a smaller image.';
  } else if (status === 415) {
    message = 'The server could not read this file as an image. Use a PNG, JPEG, WebP, GIF or BMP image.';
  } else if (status === 503 && code === 'model_not_ready') {
    message = `The model is still loading. Try again in ${wait}.`;
  } else if (status === 503) {
    message = `The server is busy: its queue is full. Try again in ${wait}.`;
  } else if (status === 504) {
    message = 'The caption took longer than the server allows. Try fewer max tokens, or try again later.';
  } else if (status === 400) {
    message = `The server refused the request: ${detail || 'invalid values'}.`;
  } else {
    message = `The server failed to caption the image (${status}${detail ? `: ${detail}` : ''}).`;
  }
  return new PlaygroundError(message, { status, code, retryAfter });
}

/** Server-sent events of a fetch response body, as parsed JSON payloads (the `[DONE]` marker ends them). */
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
      if (data === '[DONE]') return;
      if (data) yield JSON.parse(data);
    }
  }
}

/**
 * Caption `image` (a data URI) at one conservativeness level, streaming. Calls `on.alignment(applied)`,
 * `on.text(delta)`, `on.finish({finishReason, telemetry})`, `on.usage(usage)` as the chunks arrive; throws a
 * PlaygroundError in plain words. `signal` aborts it (the server then cancels the generation).
 */
export async function streamCaption({ image, prompt, level, maxTokens, apiKey, signal, limits }, on) {
  const headers = { 'Content-Type': 'application/json', Accept: 'text/event-stream' };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const body = {
    messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: image } }, { type: 'text', text: prompt }] }],
    stream: true, stream_options: { include_usage: true }, temperature: 0, max_tokens: maxTokens, conservativeness: level,
  };
  let response;
  try {
    response = await fetch('v1/chat/completions', { method: 'POST', headers, body: JSON.stringify(body), signal });
  } catch (err) {
    if (signal.aborted) throw signal.reason;
    throw new PlaygroundError('Could not reach the server. Check that it is still running, then try again.');
  }
  if (!response.ok) {
    const error = await response.json().then((b) => b.error, () => null);
    throw plainWords(response.status, error, response.headers.get('Retry-After'), limits);
  }
  try {
    for await (const chunk of sseEvents(response.body)) {
      // After the headers went out the server reports a failure in-band, as an OpenAI error body.
      if (chunk.error) throw plainWords(chunk.error.code === 'timeout' ? 504 : 500, chunk.error, null, limits);
      if (chunk.usage) on.usage(chunk.usage);
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      if (chunk.alignment && !choice.finish_reason) on.alignment(chunk.alignment);
      if (choice.delta?.content) on.text(choice.delta.content);
      if (choice.finish_reason) on.finish({ finishReason: choice.finish_reason, telemetry: chunk.telemetry ?? {} });
    }
  } catch (err) {
    if (signal.aborted) throw signal.reason;
    if (err instanceof PlaygroundError) throw err;
    throw new PlaygroundError('The connection to the server broke off during the caption. Try again.');
  }
}
