/**
 * Thin REST client of the server extension (`{base_url}elastic-gpu/api/...`).
 * Requests go to the same origin with JupyterLab's own auth (XSRF/token); no broker
 * token ever reaches the browser.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** A failed call: `status` 0 means the Jupyter server itself could not be reached. */
export class GpuApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly reason: string = 'error',
    readonly mode?: string
  ) {
    super(message);
    this.name = 'GpuApiError';
  }

  /** Broker/agent down (or the server), as opposed to a refusal such as 403. */
  get unreachable(): boolean {
    return this.status === 0 || this.status === 502 || this.status === 503 || this.status === 504;
  }
}

export async function requestAPI<T>(
  endPoint: string,
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'elastic-gpu', 'api', endPoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, { method: 'GET' }, settings);
  } catch (error) {
    throw new GpuApiError(`Jupyter server unreachable: ${String(error)}`, 0, 'server_unreachable');
  }
  const text = await response.text();
  let data: any = null;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch (error) {
      data = null;
    }
  }
  if (!response.ok) {
    const message =
      (data && typeof data.message === 'string' && data.message) ||
      `${response.status} ${response.statusText}`;
    throw new GpuApiError(message, response.status, data?.reason ?? 'error', data?.mode);
  }
  if (data === null) {
    throw new GpuApiError(`Malformed answer from ${endPoint}`, 502, 'bad_answer');
  }
  return data as T;
}
