-- Argo CD health of a sandcastle.dev SandboxTemplate, read from the kstatus conditions
-- the operator writes (Ready, Reconciling, Stalled) and status.observedGeneration.
-- status.phase is for people and is not read. Lua 5.1 with the base library only.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function describe(c)
  if c.message == nil or c.message == "" then
    return c.reason
  end
  return c.reason .. ": " .. c.message
end

-- The finalizer deletes the template on the provider; when it cannot yet, the Ready
-- condition's reason is DeletionBlocked and its message says why.
if obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "being deleted"
  local ready = condition("Ready")
  if ready ~= nil and ready.reason == "DeletionBlocked" then
    hs.message = "being deleted; " .. describe(ready)
  end
  return hs
end

-- A status the operator has not written yet, or one written for an older spec, says
-- nothing about the current spec.
if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to pick up the template"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to pick up generation " .. obj.metadata.generation
  return hs
end

-- Stalled: only a change helps (a failed build, a missing Secret or ConfigMap, a refused
-- API key, a template that does not exist on the provider).
local stalled = condition("Stalled")
if is_true(stalled) then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end

-- Reconciling: a build is queued, running, or waiting for the provider to answer again.
local reconciling = condition("Reconciling")
if is_true(reconciling) then
  hs.status = "Progressing"
  hs.message = describe(reconciling)
  return hs
end

local ready = condition("Ready")
if is_true(ready) then
  hs.status = "Healthy"
  hs.message = describe(ready)
  return hs
end

hs.status = "Progressing"
hs.message = "waiting for the Ready condition"
return hs
