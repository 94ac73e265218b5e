// Sparrow's HTTP API, as the studio uses it. Every failure is an ApiError carrying the
// sentence the API sent (SPEC §7: {"error": code, "detail": sentence}).

const KEY_STORAGE = "sparrow.apiKey";

export class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail);
    this.status = status;
    this.code = code;
  }
}

export class Api {
  constructor() {
    this.key = localStorage.getItem(KEY_STORAGE) || "";
  }

  setKey(key) {
    this.key = key;
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  }

  headers(extra = {}) {
    return this.key ? { ...extra, Authorization: `Bearer ${this.key}` } : extra;
  }

  async request(method, path, { json, body, headers = {} } = {}) {
    const init = { method, headers: this.headers(headers), cache: "no-cache" };
    if (json !== undefined) {
      init.body = JSON.stringify(json);
      init.headers["Content-Type"] = "application/json";
    } else if (body !== undefined) {
      init.body = body;
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch {
      throw new ApiError(0, "network", "The server cannot be reached.");
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async json(method, path, options) {
    const response = await this.request(method, path, options);
    return response.status === 204 ? null : response.json();
  }

  get(path) {
    return this.json("GET", path);
  }

  post(path, json) {
    return this.json("POST", path, json === undefined ? {} : { json });
  }

  async blob(path) {
    return (await this.request("GET", path)).blob();
  }

  // Uploads report their progress, which fetch cannot: XMLHttpRequest.
  upload(file, title, onProgress) {
    const form = new FormData();
    form.append("file", file);
    if (title) form.append("title", title);
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/api/chains");
      for (const [name, value] of Object.entries(this.headers())) xhr.setRequestHeader(name, value);
      xhr.responseType = "json";
      xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
      xhr.onload = () => {
        if (xhr.status === 201) resolve(xhr.response);
        else reject(errorFromBody(xhr.status, xhr.response));
      };
      xhr.onerror = () => reject(new ApiError(0, "network", "The upload did not reach the server."));
      xhr.send(form);
    });
  }

  // What the whole studio talks to, named after SPEC §3.
  chains() { return this.get("/api/chains?limit=100"); }
  chain(id) { return this.get(`/api/chains/${id}`); }
  rename(id, title) { return this.json("PATCH", `/api/chains/${id}`, { json: { title } }); }
  deleteChain(id) { return this.json("DELETE", `/api/chains/${id}`); }
  spine(id) { return this.get(`/api/chains/${id}/spine`); }
  node(id) { return this.get(`/api/nodes/${id}`); }
  branch(parentId, body) { return this.post(`/api/nodes/${parentId}/branch`, body); }
  act(nodeId, action) { return this.post(`/api/nodes/${nodeId}/${action}`); }
  stems(nodeId) { return this.get(`/api/nodes/${nodeId}/stems`); }
  separate(nodeId) { return this.post(`/api/nodes/${nodeId}/stems`); }
  streamToken(chainId) { return this.post(`/api/chains/${chainId}/stream-token`); }
  gpu() { return this.get("/api/gpu"); }

  async exportSpine(chainId, body) {
    const response = await this.request("POST", `/api/chains/${chainId}/export`, { json: body });
    const disposition = response.headers.get("Content-Disposition") || "";
    const name = /filename="?([^";]+)"?/.exec(disposition);
    return { blob: await response.blob(), filename: name ? name[1] : `spine.${body.format}` };
  }
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's page, say
  }
  return errorFromBody(response.status, body);
}

function errorFromBody(status, body) {
  if (body && typeof body.detail === "string") return new ApiError(status, body.error, body.detail);
  return new ApiError(status, "http", `The server answered ${status}.`);
}
